"""The speedup gate: whether drafting pays at the current batch size.

Breadth, depth and reranking decide the shape of a tree once the drafter
has run, but the drafter's catch-up forward (which yields the tree's first
layer) is spent before any of them is asked. Where no tree can pay for that
forward -- large batches on compute-bound hardware -- speculation is slower
than plain decoding however the tree is pruned. The gate closes that hole
with the speedup each drafted step actually achieved::

    rho   = (1 + a) / C          a = drafted tokens accepted, C = the step's
                                 predicted cost in plain target steps
                                 (catch-up + drafted layers + verify forward,
                                 read from the cost context it was planned with)
    rho^B = EMA of rho over steps planned at batch size B (weight ``weight``)

Plain decoding is ``rho = 1`` by definition. At batch size ``B`` the gate
lets the drafter run while ``rho^B >= min_speedup`` (and while nothing was
observed yet). Closed, it skips ``s`` steps, then probes with one drafted
step; a probe that still falls short doubles ``s`` (up to ``max_skip``),
one that pays reopens the gate. Probing costs at most one drafted step per
``max_skip`` plain ones, so a closed gate runs at ``>= 1 - (C - 1) /
max_skip`` of plain speed.

``rho^B`` also serves as the scale of CAST's thresholds (``threshold_scale``):
a node is worth adding when its marginal tokens per marginal cost beat the
speedup already achieved, not merely 1 (the optimum of ``(1 + U) / C`` has
``dU / dC = (1 + U) / C``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _BatchGate:
    """Gate state of one batch size."""

    speedup: float | None = None
    skip_left: int = 0
    backoff: int = 0


@dataclass
class DraftGate:
    """Per-batch-size record of achieved speedup, and the draft/skip decision it implies."""

    min_speedup: float = 1.0
    max_skip: int = 32
    weight: float = 0.25
    _by_batch: dict[int, _BatchGate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0; got {self.min_speedup}")
        if self.max_skip < 1:
            raise ValueError(f"max_skip must be >= 1; got {self.max_skip}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1]; got {self.weight}")

    def _at(self, batch_size: int) -> _BatchGate:
        return self._by_batch.setdefault(batch_size, _BatchGate())

    def speedup(self, batch_size: int) -> float | None:
        """``rho^B``: the smoothed speedup of drafted steps at ``batch_size`` (None before any)."""
        return self._at(batch_size).speedup

    def threshold_scale(self, batch_size: int) -> float:
        """``max(1, rho^B)``: what a marginal node must beat, in tokens per target step."""
        rho = self.speedup(batch_size)
        return 1.0 if rho is None else max(1.0, rho)

    def should_draft(self, batch_size: int) -> bool:
        """Whether this step at ``batch_size`` drafts (a skipped step counts down to the next probe)."""
        gate = self._at(batch_size)
        if gate.skip_left > 0:
            gate.skip_left -= 1
            return False
        return True

    def observe(self, batch_size: int, speedup: float) -> None:
        """Record one drafted step's ``rho`` at ``batch_size`` and open or close the gate."""
        if speedup < 0:
            raise ValueError(f"speedup must be >= 0; got {speedup}")
        gate = self._at(batch_size)
        gate.speedup = speedup if gate.speedup is None else (1 - self.weight) * gate.speedup + self.weight * speedup
        if gate.speedup >= self.min_speedup:
            gate.backoff = 0
        elif gate.skip_left == 0:
            gate.backoff = min(self.max_skip, max(2, 2 * gate.backoff))
            gate.skip_left = gate.backoff
