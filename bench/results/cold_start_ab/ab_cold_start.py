"""A/B of a new row's cold start in one process (run from the repository root):

    RAY_AUTH_MODE=disabled python bench/results/cold_start_ab/ab_cold_start.py <humaneval|mtbench> <B> <groups> <variant JSON>...

Each variant is a JSON object of ``CastConfig`` fields plus ``"_no_prior": 1`` (``alpha``'s initial 1 leaves the
depth FIFO at the first measured gain ratio, instead of once ``R`` of them have pushed it out) and, with
``sized_on_prior.patch`` applied (the speedup gate does not judge steps sized on the depth prior),
``"_judge_first": 1`` (it judges them, as the engine without the patch does); with
``sized_on_prior_count_told_rows.patch`` applied (or at ``e074b97``, which landed it narrowed),
``"_count_all": 1`` also counts every row of a judged step toward ``min_judged`` again (as the engine
without the patch does). The runs' logs and the engine each ran on are listed in README.md. Runs interleaved as ``bench.ab`` describes.
"""

from collections import deque
from dataclasses import dataclass

import cast_core.drafter as drafter
from bench.ab import main
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


if __name__ == "__main__":
    main(use)
