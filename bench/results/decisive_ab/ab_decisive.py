"""A/B of which rows size a batch's trees, and how their utilities combine (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/decisive_ab/ab_decisive.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields plus ``"_slack": s`` (decisive rows: the active rows with at
least ``max tokens left - s`` left; 0 is the engine's rule) and ``"_agg": "mean" | "min" | "minall"`` (a layer's
utility curve ``u_k``: the decisive rows' mean cumulative confidence, as the engine, or their minimum; "minall" also
grows a layer on the decisive rows' least ``alpha_r * u_r^(i)`` rather than the mean row's). Runs interleaved as
``bench.ab`` describes; prints, per variant, the mean number of decisive rows a drafted step had.
"""

import numpy as np

import cast_core.drafter as drafter
from bench.ab import main
from cast_core.policy import CastPolicy

COUNTS: list[int] = []
GROW = CastPolicy.grow


def use(variant: dict) -> None:
    """Pick decisive rows and combine their utilities as ``variant`` says (module docstring)."""
    slack, agg = variant.get("_slack", 0), variant.get("_agg", "mean")
    COUNTS.clear()  # use() runs before every run: the counts after a run are that run's

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


ROWS: dict[int, list[int]] = {}


def collect(i: int) -> None:
    """Keep the decisive-row counts of variant ``i``'s timed run."""
    ROWS.setdefault(i, []).extend(COUNTS)


if __name__ == "__main__":
    main(use, collect, lambda i: f"decisive rows {np.mean(ROWS[i]):.2f}")
