"""``cast serve``: start a local Ray, serve the CAST app over HTTP and gRPC, block until Ctrl-C.

    cast serve                                   # default pair, HTTP 127.0.0.1:8000, gRPC :9000
    cast serve --config my.yaml --http-port 8080 # AppConfig keys from YAML, flags override

Models are fetched (and converted) on first use before Ray starts, so the
replicas load from the local cache. Ray's token auth is set explicitly
(``RAY_AUTH_MODE``, default ``disabled`` for this single-machine cluster);
``--address`` joins an existing cluster instead of starting one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from cast_core.models import add_dtype_arg, resolve_model
from cast_core.policy import POLICY_NAMES
from cast_core.quantize import add_quantization_arg

GRPC_SERVICER = "services.grpc_api.lenient.add_cast_servicer"


def build_config(args: argparse.Namespace) -> Any:
    """``AppConfig`` from ``--config`` plus the flags that were given."""
    from services.config import AppConfig

    overrides: dict[str, Any] = {}
    for flag in ("target", "drafter", "policy", "dtype", "device", "drafter_quantization", "torch_threads", "cost_profile", "model_id"):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = value
    base = AppConfig.from_yaml(args.config).model_dump(exclude_unset=True) if args.config else {}
    config = AppConfig.model_validate({**base, **overrides})
    if config.torch_threads is None and config.device == "cpu":
        # Drafter and verifier take turns within a step: each may use every core.
        config = config.model_copy(update={"torch_threads": os.cpu_count() or 1})
    return config


def banner(host: str, http_port: int, grpc_port: int, model: str) -> str:
    """Endpoints and copy-paste examples."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    http = f"http://{shown}:{http_port}"
    return f"""
CAST is serving {model}
  HTTP (OpenAI-compatible): {http}/v1   (GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health)
  gRPC (cast.v1.Cast):      {shown}:{grpc_port}

Try:
  curl {http}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"prompt": "def fibonacci(n):", "max_tokens": 64}}'
  curl -N {http}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"messages": [{{"role": "user", "content": "Write a Python function that reverses a string."}}], "max_tokens": 128, "stream": true}}'
  python examples/grpc_client.py --server {shown}:{grpc_port} --prompt "def fibonacci(n):" --max-tokens 64 --stream

Ctrl-C stops the server.
"""


def run_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        config = build_config(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for role, name in (("target", config.target), ("drafter", config.drafter)):
        print(f"{role}: {name} -> {resolve_model(name)}", flush=True)

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.app import build_app

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=args.dashboard)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops the server even where SIGINT came in ignored (a shell starts background jobs so)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve.start(
            http_options=HTTPOptions(host=args.host, port=args.http_port),
            grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
        )
        started = time.monotonic()
        serve.run(build_app(config), name="cast", route_prefix="/")
        print(f"app ready in {time.monotonic() - started:.0f}s", flush=True)
        print(banner(args.host, args.http_port, args.grpc_port, config.served_model_id), flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cast serve``."""
    p = subparsers.add_parser("serve", help="serve the app on a local Ray (HTTP + gRPC) until Ctrl-C")
    p.add_argument("--config", default=None, help="YAML file of AppConfig keys (services/config.py)")
    p.add_argument("--target", default=None, help="target model: known name or local path (default qwen2.5-coder-1.5b-instruct)")
    p.add_argument("--drafter", default=None, help="drafter model: known name or local path (default qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--policy", default=None, choices=POLICY_NAMES, help="tree policy (default cast)")
    add_dtype_arg(p, default=None)
    p.add_argument("--device", default=None, help="torch device of the model replicas (default cpu)")
    add_quantization_arg(p, default=None)
    p.add_argument("--cost-profile", default=None, help="cost profile JSON for every device (default: look up per device)")
    p.add_argument("--model-id", default=None, help="model id shown to clients (default: the target's name)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per model replica (default: all cores on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: all)")
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    p.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cast-serve")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
