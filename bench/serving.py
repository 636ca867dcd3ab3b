"""End-to-end throughput through the HTTP endpoint vs the in-process engine (``cast bench serving``).

One process run measures both on the same model pair, prompts, ``max_new_tokens``
and dtype, greedy:

* **in-process**: ``cast_core.engine.Engine.generate`` on a group of ``c`` prompts
  (one batch of ``c``);
* **HTTP**: the same ``c`` prompts as ``c`` concurrent ``POST /v1/completions``
  (token-id prompts, so both sides see the same ids) to the Serve app started by
  this run on loopback (Router, Planner, one Drafter and one Verifier replica).

For each concurrency ``c`` the prompts form groups of ``c``; after one warm-up
of each side, group by group both sides run, alternating which goes first, so
drift of the machine hits both alike. Throughput = generated tokens / wall time
(prefill included); the ratio is HTTP / in-process.

The per-step breakdown explains the gap. The Router times every step of its
loop (Prometheus ``cast_step_latency_seconds``: draft and verify compute as the
replicas report them, ``transfer`` = the rest; a request's first step includes
its session opens); the replicas' ``debug_state`` timings split the rest into
the session opens (prefill), the drafter's and verifier's queueing (batch wait,
worker thread), the drafter's wait for the Planner, and what is left: handle
calls (Router -> replica routing and RPC), the draft tree's object-ref transfer
and the Router's own loop. The in-process step time (wall / batched steps)
includes prefill too.

Writes ``<results_dir>/<name>.json`` with the machine (``bench.harness.machine_info``);
``serving_table`` renders the markdown table.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.datasets import DATASET_NAMES, load_prompts
from bench.harness import RESULTS_DIR, machine_info, plain_top2
from bench.methods import ModelPairConfig, add_model_pair_args
from cast_core.engine import Engine
from cast_core.models import load_tokenizer, resolve_model
from cast_core.policy import POLICY_NAMES
from cast_core.quantize import quantization_of

METRICS_FLUSH_S = 60.0
SERVE_TIMEOUT_S = 600.0
_STEP_METRIC = re.compile(r'^ray_cast_step_latency_seconds_(sum|count)\{[^}]*phase="(\w+)"[^}]*\}\s+(\S+)$', re.M)


class ServingBenchConfig(ModelPairConfig):
    """What a serving benchmark run measures (both sides load the same models)."""

    name: str = Field("serving", description="Result name: written to <results_dir>/<name>.json.")
    policy: str = Field("cast", description="Tree policy of both sides.")
    dataset: str = Field("humaneval", description=f"Dataset of the prompts, one of {', '.join(DATASET_NAMES)}.")
    prompts: int = Field(8, ge=1, description="Prompts per concurrency level (rounded up to whole groups).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt.")
    warmup_tokens: int = Field(8, ge=1, description="Tokens of each side's warm-up run per concurrency level.")
    concurrency: list[int] = Field([1, 4, 8], min_length=1, description="Concurrent requests (in-process batch sizes) to measure.")
    torch_threads: int | None = Field(None, ge=1, description="Torch threads of the engine and each replica; None = this process's.")
    app_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra AppConfig fields of the served app (tests: tiny pools, fp32)."
    )


class StepBreakdown(BaseModel):
    """Where one HTTP step's time goes (means per step, seconds)."""

    steps: int = Field(description="Steps the Router ran at this level.")
    router_step_s: float = Field(description="Router-side wall time of a step: draft call through verify result (a request's first step includes its session opens).")
    session_open_s: float = Field(description="Session opens (prefill), amortised per step: the verifier's, which runs alongside the drafter's.")
    draft_compute_s: float = Field(description="Drafter forwards (catch-up and tree growth).")
    verify_compute_s: float = Field(description="Verifier forward (batched with the other sessions' steps).")
    drafter_queue_s: float = Field(description="Time in the drafter replica beyond compute and planning: batch wait, worker thread.")
    verifier_queue_s: float = Field(description="Time in the verifier replica beyond compute: batch wait, worker thread.")
    planner_s: float = Field(description="Drafter waiting for the Planner's cost context.")
    handles_and_transfer_s: float = Field(description="The rest: handle routing and RPCs, draft-tree object ref, Router loop.")
    draft_batch: float | None = Field(None, description="Sessions one drafter forward stepped, on average (calls / forwards; None: not recorded).")
    verify_batch: float | None = Field(None, description="Sessions one verifier forward stepped, on average (calls / forwards; None: not recorded).")
    inprocess_step_s: float = Field(description="In-process engine wall time per (batched) step, for comparison.")


class ServingMismatch(BaseModel):
    """Where an HTTP output first leaves the in-process output of the same prompt, and how close the target's call was.

    Both sides decode greedily with the same models in bf16; a batch of another composition rounds the logits
    differently, so outputs may part where the target's two best tokens are nearly tied (a small ``logit_gap``).
    """

    prompt_id: str = Field(description="Dataset id of the prompt.")
    position: int = Field(description="Generated tokens the outputs share: the in-process token at this index is the first the HTTP text leaves.")
    inprocess_token: int | None = Field(description="The in-process output's token there (None: it ended first).")
    plain_top1: int = Field(description="Argmax of a plain target forward on prompt + the shared tokens.")
    plain_top2: int = Field(description="Second-best token of that forward.")
    logit_gap: float = Field(description="Top-1 minus top-2 logit of that forward.")
    http_follows: str = Field(description="Which of that forward's two best tokens the HTTP text goes on with: top1, top2 or other.")
    inprocess_text: str = Field(description="The in-process output from the difference on (at most 40 characters).")
    http_text: str = Field(description="The HTTP output from the difference on (at most 40 characters).")


class LevelResult(BaseModel):
    """One concurrency level."""

    concurrency: int = Field(description="Concurrent HTTP requests = in-process batch size.")
    requests: int = Field(description="Prompts measured (whole groups).")
    http_tokens: int = Field(description="Completion tokens generated through HTTP.")
    http_wall_s: float = Field(description="Wall time of the HTTP groups.")
    http_tokens_per_s: float = Field(description="HTTP throughput.")
    inprocess_tokens: int = Field(description="Tokens generated in-process.")
    inprocess_wall_s: float = Field(description="Wall time of the in-process groups.")
    inprocess_tokens_per_s: float = Field(description="In-process throughput.")
    ratio: float = Field(description="HTTP / in-process throughput.")
    outputs_match: bool = Field(description="Every HTTP output equals the in-process output of its prompt.")
    mismatched_prompts: list[str] = Field(description="Ids of the prompts whose outputs differ.")
    mismatches: list[ServingMismatch] = Field(
        default_factory=list, description="First difference of each differing output, with the plain target's top-2 there."
    )
    breakdown: StepBreakdown | None = Field(description="Per-step overhead (None if the metrics did not arrive).")


_SPLIT_FIELDS = (
    "router_step_s",
    "session_open_s",
    "draft_compute_s",
    "verify_compute_s",
    "drafter_queue_s",
    "verifier_queue_s",
    "planner_s",
    "handles_and_transfer_s",
    "inprocess_step_s",
)


class ServingResult(BaseModel):
    """A serving benchmark run."""

    config: ServingBenchConfig = Field(description="What was measured.")
    machine: dict[str, object] = Field(description="bench.harness.machine_info of the run.")
    levels: list[LevelResult] = Field(description="One entry per concurrency level, in order.")


class _Served:
    """The app served on loopback by this run: HTTP base URL, metrics port, replica handles."""

    def __init__(self, http: str, metrics_port: int) -> None:
        from ray import serve

        self.http = http
        self.metrics_port = metrics_port
        self.drafter = serve.get_deployment_handle("Drafter", app_name="cast")
        self.verifier = serve.get_deployment_handle("Verifier", app_name="cast")

    async def complete(self, client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        reply = await client.post(self.http + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        reply.raise_for_status()
        return reply.json()

    def step_metrics(self) -> dict[str, float]:
        """Router step-latency sums and counts by phase (``sum:draft``, ``count:verify``, ...)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        totals: dict[str, float] = {}
        for kind, phase, value in _STEP_METRIC.findall(text):
            totals[f"{kind}:{phase}"] = totals.get(f"{kind}:{phase}", 0.0) + float(value)
        return totals

    def wait_steps(self, steps: int) -> dict[str, float] | None:
        """Step metrics once the Router's step count reaches ``steps`` (None after ``METRICS_FLUSH_S``)."""
        deadline = time.monotonic() + METRICS_FLUSH_S
        while time.monotonic() < deadline:
            totals = self.step_metrics()
            if totals.get("count:verify", 0) >= steps:
                return totals
            time.sleep(0.5)
        return None

    def timings(self) -> dict[str, float]:
        """Replica step timings summed over each pool (``drafter.busy_s``, ``verifier.compute_s``, ...)."""
        out: dict[str, float] = {}
        for role, handle in (("drafter", self.drafter), ("verifier", self.verifier)):
            for state in handle.broadcast("debug_state").results():
                for key, value in state["timings"].items():
                    out[f"{role}.{key}"] = out.get(f"{role}.{key}", 0.0) + value
        return out


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def breakdown(
    metrics: tuple[dict[str, float], dict[str, float]] | None,
    timings: tuple[dict[str, float], dict[str, float]],
    inprocess_step_s: float,
) -> StepBreakdown | None:
    """The per-step split from (before, after) snapshots of the Router metrics and replica timings."""
    if metrics is None:
        return None
    (m0, m1), (t0, t1) = metrics, timings
    steps = int(_delta(m1, m0, "count:verify"))
    if steps <= 0:
        return None
    draft = _delta(m1, m0, "sum:draft") / steps
    verify = _delta(m1, m0, "sum:verify") / steps
    router_step = draft + verify + _delta(m1, m0, "sum:transfer") / steps
    planner = _delta(t1, t0, "drafter.plan_s") / steps
    drafter_queue = (_delta(t1, t0, "drafter.busy_s") - _delta(t1, t0, "drafter.compute_s")) / steps - planner
    verifier_queue = (_delta(t1, t0, "verifier.busy_s") - _delta(t1, t0, "verifier.compute_s")) / steps
    session_open = _delta(t1, t0, "verifier.open_s") / steps
    return StepBreakdown(
        steps=steps,
        router_step_s=router_step,
        session_open_s=session_open,
        draft_compute_s=draft,
        verify_compute_s=verify,
        drafter_queue_s=drafter_queue,
        verifier_queue_s=verifier_queue,
        planner_s=planner,
        handles_and_transfer_s=router_step - session_open - draft - verify - drafter_queue - verifier_queue - planner,
        draft_batch=_per_forward(t0, t1, "drafter"),
        verify_batch=_per_forward(t0, t1, "verifier"),
        inprocess_step_s=inprocess_step_s,
    )


def _per_forward(before: dict[str, float], after: dict[str, float], role: str) -> float | None:
    """Mean sessions per forward of ``role``'s pool between the two snapshots (None without forwards)."""
    forwards = _delta(after, before, f"{role}.forwards")
    return _delta(after, before, f"{role}.calls") / forwards if forwards > 0 else None


def _groups(items: Sequence[Any], size: int, count: int) -> list[list[Any]]:
    """``ceil(count / size)`` groups of ``size`` items, cycling through ``items``."""
    n = math.ceil(count / size) * size
    cycled = [items[i % len(items)] for i in range(n)]
    return [cycled[i : i + size] for i in range(0, n, size)]


def _app_config(config: ServingBenchConfig, threads: int) -> dict[str, Any]:
    zero_cpu = {"ray_actor_options": {"num_cpus": 0}}
    fields: dict[str, Any] = {
        "target": config.target,
        "drafter": config.drafter,
        "dtype": config.dtype,
        "device": config.device,
        "drafter_quantization": config.drafter_quantization,
        "policy": config.policy,
        "torch_threads": threads,
        "router": zero_cpu,
        "planner": zero_cpu,
        "drafter_deployment": zero_cpu,
        "verifier_deployment": zero_cpu,
        "admission": {"max_active_requests": max(config.concurrency), "max_queued_requests": max(config.concurrency)},
    }
    fields.update(config.app_overrides)
    return fields


def _start(config: ServingBenchConfig, threads: int) -> _Served:
    """Ray (with a Prometheus endpoint), Serve on loopback and the app; ``serve.run`` under a deadline."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from services.app import build_app
    from services.config import AppConfig

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ports = [_free_port(), _free_port()]
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, _metrics_export_port=ports[1])
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=ports[0]))
    app = build_app(AppConfig.model_validate(_app_config(config, threads)))
    outcome: dict[str, BaseException] = {}

    def deploy() -> None:
        try:
            serve.run(app, name="cast", route_prefix="/")
        except BaseException as err:  # re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    thread.join(SERVE_TIMEOUT_S)  # serve.run blocks forever on an unschedulable deployment
    if thread.is_alive():
        raise TimeoutError(f"serve.run did not finish in {SERVE_TIMEOUT_S}s; status: {serve.status()}")
    if "error" in outcome:
        raise outcome["error"]
    return _Served(f"http://127.0.0.1:{ports[0]}", ports[1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_group(served: _Served, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    async with httpx.AsyncClient(timeout=3600) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(served.complete(client, p, max_tokens) for p in prompts))
        return list(replies), time.perf_counter() - started


EXCERPT_CHARS = 40


def shared_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], text: str) -> int:
    """The largest ``k`` with ``decode(token_ids[:k])`` a prefix of ``text``: tokens two outputs share when one is
    known by its ids and the other only by its text."""
    k = 0
    while k < len(token_ids) and text.startswith(tokenizer.decode(token_ids[: k + 1])):
        k += 1
    return k


def explain_serving_mismatch(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_id: str, prompt_ids: list[int], inprocess: list[int], http_text: str
) -> ServingMismatch:
    """The first token where ``http_text`` leaves the in-process output ``inprocess``, with the plain target's top-2 there."""
    shared = inprocess[: shared_tokens(tokenizer, inprocess, http_text)]
    pos = len(shared)
    top1, top2, gap = plain_top2(target, prompt_ids + shared)
    follows = next((name for name, tok in (("top1", top1), ("top2", top2)) if http_text.startswith(tokenizer.decode(shared + [tok]))), "other")
    cut = len(tokenizer.decode(shared))
    return ServingMismatch(
        prompt_id=prompt_id,
        position=pos,
        inprocess_token=inprocess[pos] if pos < len(inprocess) else None,
        plain_top1=top1,
        plain_top2=top2,
        logit_gap=gap,
        http_follows=follows,
        inprocess_text=tokenizer.decode(inprocess)[cut : cut + EXCERPT_CHARS],
        http_text=http_text[cut : cut + EXCERPT_CHARS],
    )


def _measure_level(
    engine: Engine, served: _Served, config: ServingBenchConfig, prompts: list[tuple[str, list[int]]], c: int, steps_so_far: int
) -> tuple[LevelResult, int]:
    """One concurrency level; returns it and the Router's cumulative step count afterwards."""
    groups = _groups(prompts, c, config.prompts)
    warm = [ids for _, ids in groups[0]]
    engine.generate(warm, max_new_tokens=config.warmup_tokens)
    replies, _ = asyncio.run(_http_group(served, warm, config.warmup_tokens))
    steps_so_far += sum(r["cast"]["steps"] for r in replies)
    metrics_before, timings_before = served.wait_steps(steps_so_far), served.timings()
    http_tokens = inproc_tokens = inproc_steps = 0
    http_wall = inproc_wall = 0.0
    mismatches: list[ServingMismatch] = []
    for g, group in enumerate(groups):
        ids = [p for _, p in group]
        for side in (("inprocess", "http") if g % 2 == 0 else ("http", "inprocess")):
            if side == "inprocess":
                started = time.perf_counter()
                gens = engine.generate(ids, max_new_tokens=config.max_new_tokens)
                inproc_wall += time.perf_counter() - started
                inproc_tokens += sum(len(gen.token_ids) for gen in gens)
                inproc_steps += max(gen.stats.steps for gen in gens)
            else:
                replies, wall = asyncio.run(_http_group(served, ids, config.max_new_tokens))
                http_wall += wall
                http_tokens += sum(r["usage"]["completion_tokens"] for r in replies)
                steps_so_far += sum(r["cast"]["steps"] for r in replies)
        mismatches += [
            explain_serving_mismatch(engine.target, engine.tokenizer, pid, prompt_ids, gen.token_ids, reply["choices"][0]["text"])
            for (pid, prompt_ids), gen, reply in zip(group, gens, replies)
            if reply["choices"][0]["text"] != gen.text
        ]
    metrics_after, timings_after = served.wait_steps(steps_so_far), served.timings()
    metrics = (metrics_before, metrics_after) if metrics_before is not None and metrics_after is not None else None
    http_tps, inproc_tps = http_tokens / http_wall, inproc_tokens / inproc_wall
    level = LevelResult(
        concurrency=c,
        requests=sum(len(g) for g in groups),
        http_tokens=http_tokens,
        http_wall_s=http_wall,
        http_tokens_per_s=http_tps,
        inprocess_tokens=inproc_tokens,
        inprocess_wall_s=inproc_wall,
        inprocess_tokens_per_s=inproc_tps,
        ratio=http_tps / inproc_tps,
        outputs_match=not mismatches,
        mismatched_prompts=[m.prompt_id for m in mismatches],
        mismatches=mismatches,
        breakdown=breakdown(metrics, (timings_before, timings_after), inproc_wall / max(inproc_steps, 1)),
    )
    return level, steps_so_far


def run_serving_benchmark(config: ServingBenchConfig, prompts: list[tuple[str, str]] | None = None) -> ServingResult:
    """Measure every concurrency level of ``config`` (Ray and the app are started and stopped here).

    ``prompts``: (id, text) pairs; None = the first ``config.prompts`` of ``config.dataset``.
    """
    import ray
    from ray import serve

    threads = config.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(resolve_model(config.target))
    if prompts is None:
        prompts = [(p.id, p.text) for p in load_prompts(config.dataset, tokenizer, "reported", limit=config.prompts)]
    encoded = [(pid, tokenizer(text, add_special_tokens=True)["input_ids"]) for pid, text in prompts]
    engine = Engine.from_pretrained(
        config.target,
        config.drafter,
        policy=config.policy,
        dtype=config.dtype,
        device=config.device,
        max_batch_size=max(config.concurrency),
        drafter_quantization=config.drafter_quantization,
    )
    machine = machine_info(config.dtype, config.device, "none" if engine.drafter_model is None else quantization_of(engine.drafter_model))
    try:
        served = _start(config, threads)
        levels: list[LevelResult] = []
        steps = 0
        for c in config.concurrency:
            level, steps = _measure_level(engine, served, config, encoded, c, steps)
            levels.append(level)
    finally:  # also when Serve failed to start: never leave this process's Ray running
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    return ServingResult(config=config, machine=machine, levels=levels)


def save_serving(result: ServingResult, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json``; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.config.name}.json"
    path.write_text(result.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def serving_table(result: ServingResult) -> str:
    """Markdown: throughput per level, the HTTP / in-process ratio and the per-step split (ms)."""
    lines = [
        "| concurrency | HTTP tok/s | in-process tok/s | ratio | router step ms | session open | draft | verify | drafter queue | verifier queue | planner | handles + transfer | in-process step ms | sessions a forward (draft / verify) | outputs match |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for lv in result.levels:
        b = lv.breakdown
        split = (
            [_ms(getattr(b, f)) for f in _SPLIT_FIELDS]
            if b is not None
            else ["n/a"] * len(_SPLIT_FIELDS)
        )
        batches = [None, None] if b is None else [b.draft_batch, b.verify_batch]
        split.append(" / ".join("n/a" if n is None else f"{n:.1f}" for n in batches))
        match = "yes" if lv.outputs_match else f"no ({len(lv.mismatched_prompts)})"
        if lv.mismatches:
            match += "; top-2 gaps " + ", ".join(f"{m.logit_gap:.2f}" for m in sorted(lv.mismatches, key=lambda m: m.logit_gap))
        lines.append(f"| {lv.concurrency} | {lv.http_tokens_per_s:.1f} | {lv.inprocess_tokens_per_s:.1f} | {lv.ratio:.2f} | " + " | ".join(split) + f" | {match} |")
    m = result.machine
    lines.append("")
    lines.append(f"{m.get('cpu_model')}, {m.get('usable_cpus')} usable cores, {m.get('torch_threads')} torch threads, {m.get('dtype')}; step columns: mean ms per step.")
    return "\n".join(lines)


def load_serving(path: Path) -> ServingResult:
    """Read a result written by ``save_serving``."""
    return ServingResult.model_validate_json(path.read_text(encoding="utf-8"))


def register(subparsers: Any) -> None:
    """Add ``serving`` to ``cast bench``'s subcommands."""
    p = subparsers.add_parser("serving", help="HTTP end-to-end throughput vs the in-process engine")
    add_model_pair_args(p)
    p.add_argument("--policy", default="cast", choices=POLICY_NAMES, help="tree policy")
    p.add_argument("--dataset", default="humaneval", choices=DATASET_NAMES)
    p.add_argument("--prompts", type=int, default=8, help="prompts per concurrency level")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--torch-threads", type=int, default=None, help="threads of the engine and each replica (default: torch's)")
    p.add_argument("--name", default="serving", help="result name: <results-dir>/<name>.json")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--table-only", action="store_true", help="print the table of the existing result; measure nothing")
    p.set_defaults(func=_cmd_serving)


def _cmd_serving(args: Any) -> int:
    results_dir = Path(args.results_dir)
    if args.table_only:
        print(serving_table(load_serving(results_dir / f"{args.name}.json")))
        return 0
    config = ServingBenchConfig(
        name=args.name,
        target=args.target,
        drafter=args.drafter,
        dtype=args.dtype,
        device=args.device,
        drafter_quantization=args.drafter_quantization,
        policy=args.policy,
        dataset=args.dataset,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        torch_threads=args.torch_threads,
    )
    result = run_serving_benchmark(config)
    path = save_serving(result, results_dir)
    print(serving_table(result))
    print(f"wrote {path}")
    return 0
