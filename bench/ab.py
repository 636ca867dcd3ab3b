"""Interleaved in-process A/B of CAST variants on the tuning prompts (the scripts under ``bench/results/*_ab/``).

A variant is a JSON object of ``CastConfig`` fields plus keys starting with ``_``, which the calling script
reads in its ``use(variant)`` hook (a patch of the engine, applied before every run of that variant). Per
group of ``B`` tuning prompts, with a fresh policy per variant and group: vanilla and every variant warmed up
(8 / 32 new tokens), then two rounds of vanilla followed by the variants, in order and then reversed, 128 new
tokens each. A variant's pooled speedup is vanilla's wall time over its own, each summed over its runs::

    speedup = sum_runs t_vanilla / sum_runs t_variant

(each run paired with the vanilla run that opened its round).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig

#: one timed run of a variant: (its round's vanilla wall seconds, its wall seconds, its batch steps)
Run = tuple[float, float, int]


def variant_config(variant: dict) -> CastConfig:
    """The ``CastConfig`` of ``variant``: its keys not starting with ``_``."""
    return CastConfig(**{k: v for k, v in variant.items() if not k.startswith("_")})


def run_ab(
    dataset: str,
    batch_size: int,
    n_groups: int,
    variants: list[dict],
    use: Callable[[dict], None],
    after_run: Callable[[int], None] | None = None,
    drafter_quantization: str = "mixed",
) -> dict[int, list[Run]]:
    """Run the A/B (module docstring); ``after_run(i)`` is called after each timed run of variant ``i``;
    ``drafter_quantization``: as ``ModelPair.load`` takes it (``auto``: what the machine's profiles say).

    Prints every timed run as it ends; returns each variant's runs by its index.
    """
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "bfloat16", "cpu", drafter_quantization)
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * n_groups)[:n_groups]
    runs: dict[int, list[Run]] = {i: [] for i in range(len(variants))}
    for group in groups:
        prompts = [pair.encode(p.text) for p in group]
        methods = [EngineMethod(pair, "cast", "cast", cast_config=variant_config(v)) for v in variants]
        vanilla = EngineMethod(pair, "none", "none")
        vanilla.run(prompts, 8)
        for variant, method in zip(variants, methods):
            use(variant)
            method.run(prompts, 32)
        for order in (list(range(len(variants))), list(reversed(range(len(variants))))):
            plain_s = vanilla.run(prompts, 128).wall_s
            for i in order:
                use(variants[i])
                run = methods[i].run(prompts, 128)
                if after_run is not None:
                    after_run(i)
                runs[i].append((plain_s, run.wall_s, run.stats.batch_steps))
                print(variants[i], f"vanilla {plain_s:.2f} s, cast {run.wall_s:.2f} s, {plain_s / run.wall_s:.3f}x, {run.stats.batch_steps} steps", flush=True)
    return runs


def print_pooled(variants: list[dict], runs: dict[int, list[Run]], extra: Callable[[int], str] | None = None) -> None:
    """One ``POOLED`` line a variant: its pooled speedup, its batch steps, and ``extra(i)`` where given."""
    for i, variant in enumerate(variants):
        plain, cast = sum(r[0] for r in runs[i]), sum(r[1] for r in runs[i])
        tail = f" {extra(i)}" if extra is not None else ""
        print("POOLED", variant, f"{plain / cast:.3f}x", "steps", sum(r[2] for r in runs[i]), end=tail + "\n")


def main(
    use: Callable[[dict], None],
    after_run: Callable[[int], None] | None = None,
    extra: Callable[[int], str] | None = None,
    drafter_quantization: str = "mixed",
) -> None:
    """``<humaneval|mtbench> <B> <groups> <variant JSON>...`` from the command line: run the A/B (its drafter
    quantized as ``drafter_quantization``), print the pooled lines."""
    dataset, batch_size, n_groups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    variants = [json.loads(a) for a in sys.argv[4:]]
    print_pooled(variants, run_ab(dataset, batch_size, n_groups, variants, use, after_run, drafter_quantization), extra)
