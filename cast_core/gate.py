"""The speedup gate: whether drafting pays at the current batch size.

Breadth, depth and reranking decide the shape of a tree once the drafter
has run, but the drafter's catch-up forward (which yields the tree's first
layer) is spent before any of them is asked. Where no tree can pay for that
forward -- large batches on compute-bound hardware -- speculation is slower
than plain decoding however the tree is pruned. The gate closes that hole
with what each drafted step actually achieved::

    C     = wall / t_plain^B     the step's cost in plain steps: its wall time
                                 (drafting to the next drafting call) over a
                                 plain step's at batch size B -- measured on
                                 the skipped steps, else read from a measured
                                 profile; with neither, the step's predicted
                                 cost from its cost context
    rho   = (1 + a) / C          a = drafted tokens accepted
    rho^B = running mean of rho over the first 1 / weight drafted steps
            at B, then an EMA (weight ``weight``)

A batch size seen for the first time starts from the record of the nearest
one judged within a factor 2 (sequences finishing one by one walk a batch
through every size below it; each would otherwise pay a probe).

Plain decoding is ``rho = 1`` by definition. At batch size ``B`` the gate
lets the drafter run while ``rho^B >= min_speedup``, and until ``min_judged``
drafted steps were judged there: the first trees, planned before any
acceptance was seen, are the least tuned, and one of them alone must not
shut drafting off for hundreds of steps. Closed, it skips ``s`` steps, then probes with one drafted
step. A failing probe costs ``C - 1`` plain steps, so ``s = (C - 1) /
probe_budget`` (at least twice the previous ``s``, at most ``max_skip``)
keeps the time lost to probing near ``probe_budget``; a probe that pays
reopens the gate.

A probe must not cost more the longer the gate stayed closed: the drafter
would otherwise catch up on every skipped token (at batch size ``B``, ``s``
skipped steps put ``B * s`` tokens through it). A probe's drafter feeds at
most ``probe_context`` of a row's most recent tokens, plus the row's first
``SINK_TOKENS`` when its cache is still empty (models lean on their first
tokens as attention sinks); the rest is skipped over as a gap in its cache
(``KVState.skip_positions``). Drafts may get worse for it, never wrong.

``rho^B`` also serves as the scale of CAST's thresholds (``threshold_scale``):
a node is worth adding when its marginal tokens per marginal cost beat the
speedup already achieved, not merely 1 (the optimum of ``(1 + U) / C`` has
``dU / dC = (1 + U) / C``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


#: first tokens of a row a probe feeds the drafter when its cache is empty
SINK_TOKENS = 4


@dataclass
class _BatchGate:
    """Gate state of one batch size."""

    speedup: float | None = None
    judged: int = 0
    plain_s: float | None = None
    skip_left: int = 0
    backoff: int = 0


@dataclass
class DraftGate:
    """Per-batch-size record of achieved speedup and plain step time, and the draft/skip decision."""

    min_speedup: float = 1.0
    max_skip: int = 256
    weight: float = 0.25
    probe_budget: float = 0.03
    probe_context: int = 16
    min_judged: int = 8
    _by_batch: dict[int, _BatchGate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0; got {self.min_speedup}")
        if self.max_skip < 1:
            raise ValueError(f"max_skip must be >= 1; got {self.max_skip}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1]; got {self.weight}")
        if not 0 < self.probe_budget <= 1:
            raise ValueError(f"probe_budget must be in (0, 1]; got {self.probe_budget}")
        if self.min_judged < 1:
            raise ValueError(f"min_judged must be >= 1; got {self.min_judged}")
        if self.probe_context < 1:
            raise ValueError(f"probe_context must be >= 1; got {self.probe_context}")

    def _at(self, batch_size: int) -> _BatchGate:
        """The record of ``batch_size``; a new one starts from the nearest judged batch size within a factor 2."""
        if batch_size not in self._by_batch:
            near = [b for b, g in self._by_batch.items() if g.speedup is not None and b <= 2 * batch_size and batch_size <= 2 * b]
            gate = _BatchGate()
            if near:
                nearest = self._by_batch[min(near, key=lambda b: (abs(b - batch_size), b))]
                gate.speedup, gate.judged, gate.backoff = nearest.speedup, nearest.judged, nearest.backoff
                gate.skip_left = nearest.backoff if self._closed(nearest) else 0
            self._by_batch[batch_size] = gate
        return self._by_batch[batch_size]

    def _ema(self, old: float | None, new: float, count: int = 0) -> float:
        """Moving average; the ``count``-th value (1-based) weighs ``max(weight, 1 / count)``."""
        if old is None:
            return new
        weight = max(self.weight, 1.0 / count) if count else self.weight
        return (1 - weight) * old + weight * new

    def _closed(self, gate: _BatchGate) -> bool:
        return gate.speedup is not None and gate.judged >= self.min_judged and gate.speedup < self.min_speedup

    def speedup(self, batch_size: int) -> float | None:
        """``rho^B``: the smoothed speedup of drafted steps at ``batch_size`` (None before any)."""
        return self._at(batch_size).speedup

    def plain_seconds(self, batch_size: int) -> float | None:
        """Smoothed wall time of a plain (skipped) step at ``batch_size`` (None before any)."""
        return self._at(batch_size).plain_s

    def threshold_scale(self, batch_size: int) -> float:
        """``max(1, rho^B)``: what a marginal node must beat, in tokens per target step."""
        rho = self.speedup(batch_size)
        return 1.0 if rho is None else max(1.0, rho)

    def is_closed(self, batch_size: int) -> bool:
        """Whether drafted steps at ``batch_size`` fell below ``min_speedup`` (a drafted step now is a probe)."""
        return self._closed(self._at(batch_size))

    def probe_window(self, chains: list[list[int]], cached: list[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """What a probe feeds of each row's catch-up chain, and the gap it leaves.

        ``cached[b]``: tokens row ``b`` has in the drafter's cache. A chain
        longer than ``probe_context`` keeps its last ``probe_context`` tokens,
        preceded by its first ``SINK_TOKENS`` when ``cached[b] == 0``. Returns
        the fed chains and, per row, ``(head, skipped)``: the ``skipped``
        tokens after the first ``head`` fed ones are left out.
        """
        fed: list[list[int]] = []
        gaps: list[tuple[int, int]] = []
        for chain, n_cached in zip(chains, cached):
            head = SINK_TOKENS if n_cached == 0 else 0
            skipped = max(0, len(chain) - head - self.probe_context)
            fed.append(chain[:head] + chain[head + skipped :] if skipped else chain)
            gaps.append((head, skipped) if skipped else (0, 0))
        return fed, gaps

    def should_draft(self, batch_size: int) -> bool:
        """Whether this step at ``batch_size`` drafts (a skipped step counts down to the next probe)."""
        gate = self._at(batch_size)
        if gate.skip_left > 0:
            gate.skip_left -= 1
            return False
        return True

    def observe_plain(self, batch_size: int, seconds: float) -> None:
        """Record the wall time of one plain step at ``batch_size``."""
        if seconds > 0:
            gate = self._at(batch_size)
            gate.plain_s = self._ema(gate.plain_s, seconds)

    def observe(self, batch_size: int, speedup: float, cost: float) -> None:
        """Record one drafted step at ``batch_size`` (``rho``, and ``C`` in plain steps); open or close the gate."""
        if speedup < 0 or cost <= 0:
            raise ValueError(f"speedup must be >= 0 and cost > 0; got {speedup}, {cost}")
        gate = self._at(batch_size)
        gate.judged += 1
        gate.speedup = self._ema(gate.speedup, speedup, gate.judged)
        if not self._closed(gate):
            gate.backoff = 0
        elif gate.skip_left == 0:
            wanted = math.ceil(max(0.0, cost - 1.0) / self.probe_budget)
            gate.backoff = min(self.max_skip, max(2, 2 * gate.backoff, wanted))
            gate.skip_left = gate.backoff
