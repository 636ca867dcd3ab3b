"""A GPU session's check, for a machine that can fetch no model weights.

1. The device's cost profile of a model pair, timed on models built from their ``config.json`` with
   random weights (``cast profile --random-weights``: a forward's cost depends on shapes, not values),
   over batch sizes up to 64.
2. The engine's decoding steps on that device with the same random-weight models: plain decoding and
   CAST at several batch sizes, per-step wall time and CAST's planning share of it, over a first pass
   (fresh shapes: the cache grows a token a step) and a second pass over the same prompts (shapes seen
   before; kernels that plan per shape are warm). Random weights make drafts all but never accepted, so
   this measures what a step costs beyond the models' forwards and how the speedup gate falls back to
   plain steps, not a speedup.

Run from the repository root on the GPU machine::

    python bench/device_check.py --configs DIR --out DIR

``DIR`` (``--configs``) holds one folder per model, named as the model (``config.json``; the target's
also its tokenizer files). Prints one line per (policy, batch size) and writes the profile to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from cast_core import CastConfig, Engine
from cast_core.cost import CostProfile, device_name, profile_slug
from cast_core.models import load_model, load_tokenizer
from cast_core.profiler import main as profile_main

PROFILE_BATCH_SIZES = "1,2,4,8,16,32,64"
ENGINE_BATCH_SIZES = [1, 8, 32]
PROMPT_TOKENS = 128
NEW_TOKENS = 64


def measure_steps(engine: Engine, batch: int, vocab: int, device: str) -> str:
    """Decode ``batch`` random prompts of ``PROMPT_TOKENS`` ids for ``NEW_TOKENS`` tokens twice (after an
    untimed 8-token warm-up) and summarise: ms per step of both passes, then the second pass's tokens/s,
    planning share, drafted share and accepted drafts per row step."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(1000, vocab, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(batch)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    engine.generate(prompts, max_new_tokens=8)
    step_ms = []
    for _ in range(2):
        sync()
        start = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
        sync()
        wall = time.perf_counter() - start
        step_ms.append(1000 * wall / max(g.stats.steps for g in out))
    tokens = sum(len(g.token_ids) for g in out)
    row_steps = sum(g.stats.steps for g in out)
    plan = max(g.stats.plan_s for g in out)
    drafted = sum(g.stats.drafted_steps for g in out) / row_steps
    accepted = sum(g.stats.accepted_tokens for g in out) / row_steps
    return (
        f"{engine.policy.name:>6} B={batch:<3} {step_ms[0]:6.2f} / {step_ms[1]:6.2f} ms/step (1st / 2nd pass)  "
        f"{tokens / wall:8.1f} tok/s  planning {100 * plan / wall:5.2f}%  drafted {100 * drafted:5.1f}% of row steps  "
        f"accepted {accepted:.2f}/row step"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, required=True, help="folder of model folders named as the models")
    parser.add_argument("--out", type=Path, required=True, help="folder the profile is written to")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="target model folder name")
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct", help="drafter model folder name")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default: bfloat16)")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument(
        "--engine-batch-sizes",
        default=ENGINE_BATCH_SIZES,
        type=lambda text: [int(x) for x in text.split(",")],
        help="comma-separated batch sizes of the engine steps (default: 1,8,32)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{device_name(args.device)}, torch {torch.__version__}", flush=True)
    os.chdir(args.configs)  # the profile names the models by their folder names
    argv_profile = ["--target", args.target, "--drafter", args.drafter, "--dtype", args.dtype, "--device", args.device]
    argv_profile += ["--batch-sizes", PROFILE_BATCH_SIZES, "--drafter-quantization", "none", "--random-weights", "--out", str(out)]
    if profile_main(argv_profile) != 0:
        return 1
    profile = CostProfile.load(out / f"{profile_slug(device_name(args.device), args.target, args.drafter, args.dtype)}.json")
    target = load_model(args.target, args.dtype, args.device, random_weights=True)
    drafter = load_model(args.drafter, args.dtype, args.device, random_weights=True)
    tokenizer = load_tokenizer(args.target)
    for batch in args.engine_batch_sizes:
        for policy in ("none", "cast"):
            engine = Engine(
                target,
                tokenizer,
                drafter,
                policy=policy,
                cost_profile=profile,
                max_batch_size=batch,
                cast_config=CastConfig(),
            )
            print(measure_steps(engine, batch, target.config.vocab_size, args.device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
