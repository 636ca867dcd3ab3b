"""Load test of the served app on loopback: steady streaming clients, then a burst.

Scenario (``run_load``): ``clients`` concurrent clients each stream greedy
completions back to back for ``duration_s`` (a declared rejection -- HTTP
429/503 with Retry-After -- makes that client wait ``min(Retry-After, 1 s)``
and go on), then ``burst`` requests are sent at once, beyond the admission
queue. Every request ends as exactly one of

* completed: HTTP 200 and a stream whose text equals the in-process greedy run
  on the same prompt (computed beforehand for a small fixed prompt set);
* rejected: 429/503 with a Retry-After header (declared back-pressure);
* failed: anything else (another status, a broken stream, a wrong output).

Afterwards the script waits for every drafter and verifier replica to hold no
session and records replica memory (RSS) before and after.

Run (tiny models by default; ``--target/--drafter`` for a real pair)::

    python -m bench.load --clients 64 --duration 60 --burst 128

writes ``bench/results/load.json``. ``tests/test_load.py`` runs the same
scenario at CI size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

APP_NAME = "cast"
MODEL_DEPLOYMENTS = ("Drafter", "Verifier")
REPLICA_CLASS_PREFIX = f"ServeReplica:{APP_NAME}:"
RESULTS_PATH = Path(__file__).parent / "results" / "load.json"
MAX_REJECTED_WAIT_S = 1.0


# --- replica state (needs a connected Ray driver) -------------------------------------------


def session_counts(deployment: str) -> dict[str, int]:
    """Sessions held per replica id of ``deployment`` (its ``debug_state``)."""
    from ray import serve

    states = serve.get_deployment_handle(deployment, app_name=APP_NAME).broadcast("debug_state").results()
    return {s["replica_id"]: len(s["sessions"]) for s in states}


def sessions_left(timeout_s: float = 30.0) -> dict[str, int]:
    """Sessions held per model deployment, once all are freed or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {name: sum(session_counts(name).values()) for name in MODEL_DEPLOYMENTS}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def wait_sessions_freed(timeout_s: float = 30.0) -> None:
    """Assert that every drafter and verifier replica frees all its sessions within ``timeout_s``."""
    left = sessions_left(timeout_s)
    assert not any(left.values()), f"sessions still held after {timeout_s}s: {left}"


def replica_actor(deployment: str, replica_id: str) -> Any:
    """The actor handle of one replica of ``deployment``."""
    import ray

    suffix = f"#{deployment}#{replica_id}"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(suffix)]
    return ray.get_actor(name, namespace="serve")


def process_rss(pid: int) -> int | None:
    """Resident memory (bytes) of a local process, from ``/proc/<pid>/status`` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def replica_rss() -> dict[str, int]:
    """Resident memory (bytes) of each live replica process of the app, by actor name (local node)."""
    from ray._private import state  # the public state API needs the dashboard

    rss = {}
    for actor in state.actors().values():
        if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith(REPLICA_CLASS_PREFIX):
            value = process_rss(actor["Pid"])
            if value is not None:
                rss[actor["Name"]] = value
    return rss


# --- the client side -------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one phase's requests."""

    completed: int = 0
    rejected: int = 0
    failed: int = 0
    completion_tokens: int = 0
    latency_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(why)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.completed + self.rejected + self.failed,
            "completed": self.completed,
            "rejected": self.rejected,
            "failed": self.failed,
            "failures": self.failures,
            "wall_s": round(self.wall_s, 3),
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_s": percentiles(self.latency_s),
            "first_token_s": percentiles(self.first_token_s),
        }


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``values`` (empty dict when there are none)."""
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": round(cuts[49], 4), "p90": round(cuts[89], 4), "p99": round(cuts[98], 4), "max": round(max(values), 4)}


@dataclass
class Workload:
    """Prompts, their expected greedy completions, and the request size."""

    prompts: list[list[int]]
    expected: list[str]
    expected_tokens: list[int]
    max_tokens: int


async def request(client: httpx.AsyncClient, base: str, work: Workload, index: int, tally: Tally) -> float | None:
    """One streaming completion, tallied; returns the Retry-After (s) of a declared rejection."""
    i = index % len(work.prompts)
    body = {"prompt": work.prompts[i], "max_tokens": work.max_tokens, "stream": True}
    started = time.perf_counter()
    text, first = "", None
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code in (429, 503) and "retry-after" in r.headers:
                tally.rejected += 1
                return float(r.headers["retry-after"])
            if r.status_code != 200:
                tally.fail(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return None
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    first = first if first is not None else time.perf_counter() - started
                    text += chunk["choices"][0]["text"] if chunk["choices"] else ""
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
        tally.fail(f"{type(err).__name__}: {err}")
        return None
    if text != work.expected[i]:
        tally.fail(f"prompt {i}: output differs from the greedy reference")
        return None
    tally.completed += 1
    tally.completion_tokens += work.expected_tokens[i]
    tally.latency_s.append(time.perf_counter() - started)
    tally.first_token_s.append(first if first is not None else 0.0)
    return None


async def steady(base: str, work: Workload, clients: int, duration_s: float) -> Tally:
    """``clients`` clients streaming back to back until ``duration_s`` has passed."""
    tally = Tally()
    deadline = time.monotonic() + duration_s

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            retry_after = await request(client, base, work, c + n * clients, tally)
            n += 1
            if retry_after is not None:
                await asyncio.sleep(min(retry_after, MAX_REJECTED_WAIT_S))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
    tally.wall_s = time.monotonic() - started
    return tally


async def burst(base: str, work: Workload, size: int) -> Tally:
    """``size`` requests sent at once."""
    tally = Tally()
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        await asyncio.gather(*(request(client, base, work, i, tally) for i in range(size)))
    tally.wall_s = time.monotonic() - started
    return tally


def run_load(base: str, work: Workload, clients: int, duration_s: float, burst_size: int) -> dict[str, Any]:
    """The whole scenario against a served app (this process must be a Ray driver of its cluster)."""
    rss_before = replica_rss()
    phases = {
        "steady": asyncio.run(steady(base, work, clients, duration_s)),
        "burst": asyncio.run(burst(base, work, burst_size)),
    }
    left = sessions_left()
    rss_after = replica_rss()
    return {
        "clients": clients,
        "duration_s": duration_s,
        "burst": burst_size,
        "max_tokens": work.max_tokens,
        "prompts": len(work.prompts),
        "phases": {name: tally.summary() for name, tally in phases.items()},
        "totals": {k: sum(t.summary()[k] for t in phases.values()) for k in ("requests", "completed", "rejected", "failed")},
        "sessions_left": left,
        "replica_rss_mb": {
            "before": {k: round(v / 2**20, 1) for k, v in sorted(rss_before.items())},
            "after": {k: round(v / 2**20, 1) for k, v in sorted(rss_after.items())},
        },
    }


def rss_growth(result: dict[str, Any]) -> dict[str, float]:
    """RSS after / before per replica present in both records."""
    before, after = result["replica_rss_mb"]["before"], result["replica_rss_mb"]["after"]
    return {k: round(after[k] / before[k], 3) for k in before if k in after}


# --- the script ------------------------------------------------------------------------------


def reference(target: Path, drafter: Path, prompts: list[list[int]], max_tokens: int, dtype: str) -> Workload:
    """The workload with the in-process engine's greedy completions (the target's own greedy output)."""
    from cast_core.engine import Engine

    engine = Engine.from_pretrained(target, drafter, policy="none", dtype=dtype)
    gens = engine.generate(prompts, max_new_tokens=max_tokens)
    return Workload(prompts, [g.text for g in gens], [len(g.token_ids) for g in gens], max_tokens)


def app_config(target: Path, drafter: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``AppConfig`` fields of the served app under load."""
    pool = {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0}}
    return {
        "target": str(target),
        "drafter": str(drafter),
        "dtype": args.dtype,
        "torch_threads": 1,
        "router": {"ray_actor_options": {"num_cpus": 0}},
        "planner": {"ray_actor_options": {"num_cpus": 0}},
        "drafter_deployment": pool,
        "verifier_deployment": pool,
        "admission": {"max_active_requests": args.max_active, "max_queued_requests": args.max_queued, "retry_after_s": 1},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="Concurrent streaming clients of the steady phase.")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of the steady phase.")
    parser.add_argument("--burst", type=int, default=128, help="Requests sent at once after the steady phase.")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request.")
    parser.add_argument("--prompts", type=int, default=16, help="Distinct prompts (their references computed first).")
    parser.add_argument("--replicas", type=int, default=2, help="Drafter and verifier replicas each.")
    parser.add_argument("--max-active", type=int, default=32, help="Admission: requests running at once.")
    parser.add_argument("--max-queued", type=int, default=32, help="Admission: requests waiting; beyond, 429.")
    parser.add_argument("--target", type=Path, help="Target model folder (default: the test suite's tiny pair).")
    parser.add_argument("--drafter", type=Path, help="Drafter model folder (with --target).")
    parser.add_argument("--dtype", default="float32", help="Model dtype.")
    parser.add_argument("--note", default="", help="Free text stored with the result (e.g. whether the machine was shared).")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="Result JSON path.")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import ray
    from ray import serve

    from bench.harness import machine_info
    from serve_utils import free_port, run_app, save_tiny_models, start_serve
    from services.app import build_app
    from services.config import AppConfig
    from conftest import random_prompts

    with tempfile.TemporaryDirectory() as tmp:
        target, drafter = (args.target, args.drafter) if args.target else save_tiny_models(Path(tmp))
        prompts = random_prompts(args.prompts, seed=7)
        work = reference(target, drafter, prompts, args.max_tokens, args.dtype)
        ray.init(include_dashboard=False)
        try:
            port = free_port()
            start_serve(port, None)
            run_app(build_app(AppConfig.model_validate(app_config(target, drafter, args))))
            result = run_load(f"http://127.0.0.1:{port}", work, args.clients, args.duration, args.burst)
        finally:
            serve.shutdown()
            ray.shutdown()
    result.update(
        models={"target": str(args.target or "tiny (tests/serve_utils.save_tiny_models)"), "drafter": str(args.drafter or "tiny")},
        config=app_config(Path("target"), Path("drafter"), args) | {"target": None, "drafter": None},
        rss_growth=rss_growth(result),
        machine=machine_info(args.dtype, "cpu"),
        note=args.note,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("totals", "sessions_left", "rss_growth")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
