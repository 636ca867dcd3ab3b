"""A/B of the depth rule's verify price in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/depth_margin_ab/ab_depth_margin.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields; ``"_chain": 1`` prices the next layer's node after the
chain's ``i`` tokens (``verified`` None, as before the change) instead of after the ``m_i`` nodes reranking would
verify; ``"_whole": 1`` grows the next layer on the whole kept layer's gain priced as one verified node,
``alpha * u^(i) - covered >= C2 * (C_D(B, n_i) + C_T(B, m_i + 2) - C_T(B, m_i + 1))`` (the rule before ``7d5bcca``;
the engine's rule asks that of some ``k`` of the next layer's nodes, each priced). The ``share_*.log`` runs
predate ``7d5bcca``: in them ``"_share": 1`` was the engine's rule and ``{}`` the ``"_whole"`` one. Runs
interleaved as ``bench.ab`` describes.
"""

import numpy as np

import cast_core.drafter as drafter
from bench.ab import main
from cast_core.policy import CastPolicy

MARGIN = drafter._verified_so_far
GROW = CastPolicy.grow


def grow_whole(self, layer, kept, ctx, histories, covered=0.0, verified=None):
    """The ``"_whole"`` depth rule (module docstring)."""
    if layer >= self.config.max_depth:
        return False
    alpha = float(np.mean([h.alpha() for h in histories])) if histories else 1.0
    m = layer if verified is None else verified
    cost = ctx.drafter_cost(kept.shape[1]) + ctx.target_cost(m + 2) - ctx.target_cost(m + 1)
    return alpha * float(kept.sum(axis=1).mean()) - covered >= self._threshold(self.config.c2, ctx) * cost


def use(variant: dict) -> None:
    """Price depth as ``variant`` says (module docstring)."""
    drafter._verified_so_far = (lambda *args: None) if variant.get("_chain") else MARGIN
    CastPolicy.grow = grow_whole if variant.get("_whole") else GROW


if __name__ == "__main__":
    main(use)
