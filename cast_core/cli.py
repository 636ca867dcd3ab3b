"""Core subcommands of the ``cast`` CLI: ``models``, ``profile`` and ``generate``.

The console script itself (``services.cli:main``) adds ``serve`` and ``bench``;
this module stays free of ray.
"""

from __future__ import annotations

import argparse
import sys

from cast_core import fetch, profiler
from cast_core.engine import DEFAULT_DRAFTER, DEFAULT_TARGET, Engine
from cast_core.models import add_dtype_arg
from cast_core.policy import POLICY_NAMES
from cast_core.quantize import add_quantization_arg


def run_generate(args: argparse.Namespace) -> int:
    """``cast generate``: stream one completion to stdout, then its acceptance stats to stderr."""
    try:
        engine = Engine.from_pretrained(
            target=args.target,
            drafter=args.drafter,
            policy=args.policy,
            dtype=args.dtype,
            device=args.device,
            cost_profile=args.cost_profile,
            drafter_quantization=args.drafter_quantization,
        )
        prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        events = engine.stream(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
        )
        if not args.chat:
            print(args.prompt, end="", flush=True)
        for event in events:
            print(event.text, end="", flush=True)
            if event.generation is not None:
                g = event.generation
                s = g.stats
                print(
                    f"\n\n[{len(g.token_ids)} tokens, finish={g.finish_reason}, policy={args.policy}, "
                    f"steps={s.steps}, mean accepted length={s.mean_accepted_length:.2f}, "
                    f"verified/step={s.verified_tokens / max(s.steps, 1):.1f}, "
                    f"draft {s.draft_s:.2f}s verify {s.verify_s:.2f}s plan {s.plan_s * 1e3:.1f}ms]",
                    file=sys.stderr,
                )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def register_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate a completion in process (no Ray)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model: known name or local path")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER, help="drafter model: known name or local path")
    p.add_argument("--policy", default="cast", choices=POLICY_NAMES, help="tree policy")
    add_dtype_arg(p)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--cost-profile", default=None, help="cost profile JSON (default: look up by device)")
    add_quantization_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.set_defaults(func=run_generate)


def register_core(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models``, ``profile`` and ``generate``."""
    fetch.register_cli(subparsers)
    profiler.register_cli(subparsers)
    register_generate(subparsers)
