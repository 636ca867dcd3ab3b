"""A/B of a new row's cold start in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/cold_start_ab/ab_cold_start.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields plus ``"_no_prior": 1`` (``alpha``'s initial 1 leaves the
depth FIFO at the first measured gain ratio, instead of once ``R`` of them have pushed it out) and, with
``sized_on_prior.patch`` applied (the speedup gate does not judge steps sized on the depth prior),
``"_judge_first": 1`` (it judges them, as the engine without the patch does). The runs' logs and the engine each
ran on are listed in README.md. Per group of B tuning prompts, with a fresh policy per group: vanilla
and every variant warmed up (8 / 32 tokens), then two rounds of vanilla followed by the variants, in order and then
reversed, 128 new tokens each; pooled speedup = vanilla's wall over the variant's, summed over the runs.
"""

import json
import sys
from collections import deque
from dataclasses import dataclass

import cast_core.drafter as drafter
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig
from cast_core.gate import DraftGate
from cast_core.policy import DepthHistory, DraftedStep

FIFO, ALPHA = DepthHistory.__post_init__, DepthHistory.alpha


def _empty(self: DepthHistory) -> None:
    self.ratios = deque(self.ratios, maxlen=self.r)


def _alpha(self: DepthHistory) -> float:
    return ALPHA(self) if self.ratios else 1.0


@dataclass
class _JudgedFirst(DraftedStep):
    def __post_init__(self) -> None:
        self.on_prior = False


OBSERVE = DraftGate.observe


def _count_all(self, batch_size, tokens, cost, on_profile=False, rows=None):
    return OBSERVE(self, batch_size, tokens, cost, on_profile)


def use(variant: dict) -> None:
    """Start rows as ``variant`` says (module docstring)."""
    no_prior = bool(variant.get("_no_prior"))
    DepthHistory.__post_init__ = _empty if no_prior else FIFO
    DepthHistory.alpha = _alpha if no_prior else ALPHA
    drafter.DraftedStep = _JudgedFirst if variant.get("_judge_first") else DraftedStep
    DraftGate.observe = _count_all if variant.get("_count_all") else OBSERVE


def config(variant: dict) -> CastConfig:
    return CastConfig(**{k: v for k, v in variant.items() if not k.startswith("_")})


def main(dataset: str, batch_size: int, n_groups: int, variants: list[dict]) -> None:
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "bfloat16", "cpu", "mixed")
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * n_groups)[:n_groups]
    runs: dict[int, list[tuple[float, float, int]]] = {i: [] for i in range(len(variants))}
    for group in groups:
        prompts = [pair.encode(p.text) for p in group]
        methods = [EngineMethod(pair, "cast", "cast", cast_config=config(v)) for v in variants]
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
                runs[i].append((plain_s, run.wall_s, run.stats.batch_steps))
                print(variants[i], f"vanilla {plain_s:.2f} s, cast {run.wall_s:.2f} s, {plain_s / run.wall_s:.3f}x, {run.stats.batch_steps} steps", flush=True)
    for i, variant in enumerate(variants):
        plain, cast = sum(r[0] for r in runs[i]), sum(r[1] for r in runs[i])
        print("POOLED", variant, f"{plain / cast:.3f}x", "steps", sum(r[2] for r in runs[i]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [json.loads(a) for a in sys.argv[4:]])
