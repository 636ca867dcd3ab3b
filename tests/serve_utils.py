"""Helpers of the service tests: tiny models on disk, one Ray per module, guarded ``serve.run``."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cast_core.engine import Engine
from cast_core.cost import CostProfile
from conftest import tiny_pair, tiny_tokenizer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SERVE_TIMEOUT_S = 180.0
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"


def save_tiny_models(root: Path, seed: int = 0, noise: float = 0.002) -> tuple[Path, Path]:
    """Save the tiny target/drafter pair (fp32) with the tiny tokenizer; returns their folders.

    The drafter noise is small enough that about half the drafted tokens are accepted.
    """
    target, drafter = tiny_pair("llama", torch.float32, seed=seed, noise=noise)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    paths = []
    for name, model in (("tiny-target", target), ("tiny-drafter", drafter)):
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def synthetic_profile(path: Path, per_token_s: float = 0.002) -> Path:
    """A synthetic profile whose per-token cost grows with the batch (f = base + p * B * n)."""
    return CostProfile.synthetic(0.01, per_token_s, 0.003, per_token_s / 10).save(path)


def reference_engine(target: Path, drafter: Path) -> Engine:
    """The in-process engine on the same saved models (greedy output is the target's)."""
    return Engine.from_pretrained(target, drafter, policy="cast", dtype="float32", cost_profile=CostProfile.synthetic(0.01, 0.002, 0.003, 0.0002))


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range and not handed out before.

    An ephemeral port (what binding port 0 returns) can be taken by a process the test starts
    (Ray's GCS, raylet and workers bind ephemeral ports) before the server binds it: a CI run
    failed with ``Failed to bind to address '127.0.0.1:40699'``.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(max(1024, ephemeral_low - 12000), ephemeral_low)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def tiny_config(target: Path, drafter: Path, **overrides: Any) -> dict[str, Any]:
    """``AppConfig`` fields for the tiny pair on a 2-core box (no CPU reservations, one torch thread)."""
    zero_cpu = {"ray_actor_options": {"num_cpus": 0}}
    config: dict[str, Any] = {
        "target": str(target),
        "drafter": str(drafter),
        "dtype": "float32",
        "torch_threads": 1,
        "router": zero_cpu,
        "planner": zero_cpu,
        "drafter_deployment": zero_cpu,
        "verifier_deployment": zero_cpu,
        "telemetry": {"tracing_exporter": "memory"},
        "default_max_tokens": 24,
    }
    config.update(overrides)
    return config


def start_serve(http_port: int, grpc_port: int | None, proxy_location: str = "EveryNode") -> None:
    """Start Serve's proxies on loopback (gRPC with the cast.v1 servicer when ``grpc_port`` is set)."""
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    grpc = (
        gRPCOptions(port=grpc_port, grpc_servicer_functions=["services.grpc_api.lenient.add_cast_servicer"])
        if grpc_port
        else None
    )
    serve.start(proxy_location=proxy_location, http_options=HTTPOptions(host="127.0.0.1", port=http_port), grpc_options=grpc)


@contextmanager
def served_app(config: dict[str, Any], grpc: bool = True, **ray_options: Any) -> Iterator[tuple[int, int | None]]:
    """A local Ray (never joining a cluster someone else started), Serve on loopback and the app of ``config``.

    Yields ``(http_port, grpc_port)`` (``grpc_port`` None without gRPC); shuts Serve and Ray down after.
    """
    import ray
    from ray import serve

    from services.app import build_app
    from services.config import AppConfig

    ray.init(address="local", num_cpus=4, include_dashboard=False, **ray_options)
    try:
        http_port, grpc_port = free_port(), free_port() if grpc else None
        start_serve(http_port, grpc_port)
        run_app(build_app(AppConfig.model_validate(config)))
        yield http_port, grpc_port
    finally:
        serve.shutdown()
        ray.shutdown()


def run_app(app: Any, timeout_s: float = SERVE_TIMEOUT_S, name: str = "cast") -> Any:
    """``serve.run`` in a thread with a deadline (it blocks forever on an unschedulable deployment)."""
    from ray import serve

    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["handle"] = serve.run(app, name=name, route_prefix="/")
        except BaseException as err:  # reported below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"serve.run did not finish in {timeout_s}s; status: {serve.status()}")
    if "error" in result:
        raise result["error"]
    print(f"serve.run took {time.monotonic() - started:.1f}s")
    return result["handle"]
