"""A/B of the depth rule's verify price in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/depth_margin_ab/ab_depth_margin.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields; ``"_chain": 1`` prices the next layer's node after the
chain's ``i`` tokens (``verified`` None, as before the change) instead of after the ``m_i`` nodes reranking would
verify. Runs interleaved as ``bench.ab`` describes.
"""

import cast_core.drafter as drafter
from bench.ab import main

MARGIN = drafter._verified_so_far


def use(variant: dict) -> None:
    """Price depth as ``variant`` says (module docstring)."""
    drafter._verified_so_far = (lambda *args: None) if variant.get("_chain") else MARGIN


if __name__ == "__main__":
    main(use)
