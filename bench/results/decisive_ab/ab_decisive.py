"""A/B of which rows size a batch's trees, and how their utilities combine (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/decisive_ab/ab_decisive.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields plus ``"_slack": s`` (decisive rows: the active rows with at
least ``max tokens left - s`` left; 0 is the engine's rule) and ``"_agg": "mean" | "min" | "minall"`` (a layer's
utility curve ``u_k``: the decisive rows' mean cumulative confidence, as the engine, or their minimum; "minall" also
grows a layer on the decisive rows' least ``alpha_r * u_r^(i)`` rather than the mean row's). Per group of B tuning
prompts: vanilla and every variant warmed up (8 / 32 tokens), then two rounds of vanilla followed by the variants,
in order and then reversed, 128 new tokens each; pooled speedup = vanilla's wall over the variant's, summed over the
runs. Prints, per variant, the mean number of decisive rows a drafted step had.
"""

import json
import sys

import numpy as np

import cast_core.drafter as drafter
from bench.datasets import load_prompts
from bench.harness import make_groups
from bench.methods import EngineMethod, ModelPair
from cast_core import CastConfig
from cast_core.policy import CastPolicy

COUNTS: list[int] = []
GROW = CastPolicy.grow


def use(variant: dict) -> None:
    """Pick decisive rows and combine their utilities as ``variant`` says (module docstring)."""
    slack, agg = variant.get("_slack", 0), variant.get("_agg", "mean")

    def decisive_rows(plans, active):
        left = np.array([plan.budget_left for plan in plans])
        rows = active & (left >= left[active].max() - slack)
        COUNTS.append(int(rows.sum()))
        return rows

    def utility(confidences):
        cum = np.cumsum(confidences, axis=1)
        return np.concatenate([[0.0], cum.min(axis=0) if agg in ("min", "minall") else cum.mean(axis=0)])

    def grow(self, layer, kept, ctx, histories, covered=0.0, verified=None):
        if agg != "minall":
            return GROW(self, layer, kept, ctx, histories, covered, verified)
        if layer >= self.config.max_depth:
            return False
        gain = min(h.alpha() * float(u) for h, u in zip(histories, kept.sum(axis=1)))
        m = layer if verified is None else verified
        cost = ctx.drafter_cost(kept.shape[1]) + ctx.target_cost(m + 2) - ctx.target_cost(m + 1)
        return gain - covered >= self._threshold(self.config.c2, ctx) * cost

    drafter._decisive_rows = decisive_rows
    CastPolicy._utility = staticmethod(utility)
    CastPolicy.grow = grow


def config(variant: dict) -> CastConfig:
    return CastConfig(**{k: v for k, v in variant.items() if not k.startswith("_")})


def main(dataset: str, batch_size: int, n_groups: int, variants: list[dict]) -> None:
    pair = ModelPair.load("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "bfloat16", "cpu", "mixed")
    groups = make_groups(load_prompts(dataset, pair.tokenizer, "tuning"), batch_size, batch_size * n_groups)[:n_groups]
    runs: dict[int, list[tuple[float, float, int]]] = {i: [] for i in range(len(variants))}
    rows: dict[int, list[int]] = {i: [] for i in range(len(variants))}
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
                COUNTS.clear()
                run = methods[i].run(prompts, 128)
                rows[i] += COUNTS
                runs[i].append((plain_s, run.wall_s, run.stats.batch_steps))
                print(variants[i], f"vanilla {plain_s:.2f} s, cast {run.wall_s:.2f} s, {plain_s / run.wall_s:.3f}x, {run.stats.batch_steps} steps", flush=True)
    for i, variant in enumerate(variants):
        plain, cast = sum(r[0] for r in runs[i]), sum(r[1] for r in runs[i])
        print("POOLED", variant, f"{plain / cast:.3f}x", "steps", sum(r[2] for r in runs[i]), f"decisive rows {np.mean(rows[i]):.2f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [json.loads(a) for a in sys.argv[4:]])
