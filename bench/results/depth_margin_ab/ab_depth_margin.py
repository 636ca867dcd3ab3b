"""A/B of the depth rule's verify price in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/depth_margin_ab/ab_depth_margin.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields; ``"_chain": 1`` prices the next layer's node after the
chain's ``i`` tokens (``verified`` None, as before the change) instead of after the ``m_i`` nodes reranking would
verify; ``"_share": 1`` grows the next layer iff some ``k`` of its nodes pay for the forward and their own
verification, ``max_k (alpha * U_k^(i) - covered) / (C_D(B, n_i) + C_T(B, m_i + 1 + k) - C_T(B, m_i + 1)) >= C2``,
``U_k^(i)`` the mean row's sum of its ``k`` largest kept ``v`` (instead of the whole layer's gain over one node's
price). Runs interleaved as ``bench.ab`` describes.
"""

import numpy as np

import cast_core.drafter as drafter
from bench.ab import main
from cast_core.policy import CastPolicy

MARGIN = drafter._verified_so_far
GROW = CastPolicy.grow


def grow_share(self, layer, kept, ctx, histories, covered=0.0, verified=None):
    """The ``"_share"`` depth rule (module docstring)."""
    if layer >= self.config.max_depth:
        return False
    alpha = float(np.mean([h.alpha() for h in histories])) if histories else 1.0
    top = np.cumsum(-np.sort(-kept, axis=1), axis=1).mean(axis=0)  # U_k, k = 1..n_i
    m = layer if verified is None else verified
    base = ctx.target_cost(m + 1)
    cost = np.array([ctx.drafter_cost(kept.shape[1]) + ctx.target_cost(m + 1 + k) - base for k in range(1, len(top) + 1)])
    return bool(((alpha * top - covered) / cost).max() >= self._threshold(self.config.c2, ctx))


def use(variant: dict) -> None:
    """Price depth as ``variant`` says (module docstring)."""
    drafter._verified_so_far = (lambda *args: None) if variant.get("_chain") else MARGIN
    CastPolicy.grow = grow_share if variant.get("_share") else GROW


if __name__ == "__main__":
    main(use)
