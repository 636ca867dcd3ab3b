"""The speedup gate: whether drafting pays at the current batch size.

Breadth, depth and reranking decide the shape of a tree once the drafter
has run, but the drafter's catch-up forward (which yields the tree's first
layer) is spent before any of them is asked. Where no tree can pay for that
forward -- large batches on compute-bound hardware -- speculation is slower
than plain decoding however the tree is pruned. The gate closes that hole
with what drafted steps actually achieved::

    C     = wall / t_plain^B     a drafted step's cost in plain steps: its wall
                                 time (drafting to the next drafting call) over
                                 a plain step's at batch size B -- measured on
                                 the skipped steps, else read from a measured
                                 profile; with neither, the step's predicted
                                 cost from its cost context. The catch-up of
                                 the plain steps' tokens before it (thinned,
                                 skipped; its share of the catch-up forward,
                                 ``cast_core.drafter._catch_up_excess``) is left
                                 out, as is a new row's prompt: an open gate
                                 drafts every step and carries no backlog, and
                                 that is what the record predicts; the backlog is
                                 the price of thinning and probing, charged to
                                 their budget (``C_full``, below)
    n     = 1 + a                tokens it committed (a = accepted drafts) to the
                                 rows with the most tokens left, whose progress
                                 ends the batch (``cast_core.drafter._report_speedups``)
    T, K <- d T + n, d K + C     with d = exp(-C / window)
    rho^B = T / K                tokens per plain step's worth of drafting time

``rho^B`` is the throughput of drafting at ``B`` over the last ``window``
plain steps' worth of drafted time, relative to plain decoding (one token per
plain step). A ratio of sums, not a mean of per-step ratios: a large tree
that accepts nothing costs its whole wall time once, where averaging ratios
would let one cheap miss or one dear miss count as much as a run of good
steps. Before the first decay takes hold, the sums are plain sums over the
steps judged so far.

``rho^B`` is only as good as the plain step it divides by. Before a skipped
step at ``B`` has been timed, that is the profile's (or the predicted cost's),
measured on another day, perhaps under another load: 12 % slower than
profiled makes a 1.12x drafted step read 1.0x. And the plain step grows with
the context (B=8, Intel Xeon with AMX: 0.25 s at a HumanEval batch's start,
0.29 s 100 steps on), so a drafted step late in a batch judged against plain
steps timed early reads drafting's gain low: at HumanEval B=4 a gate judging
against a 0.18 s median closed at 0.71x where vanilla's steps took
0.25-0.30 s and drafting with the gate open ran 1.17x. So a timed plain step
is kept as its machine scale, its wall time over the profile's plain step
``t_ref(B, ctx)`` at its own context, and a drafted step at context ``ctx``
is judged against ``m^B t_ref(B, ctx)``, ``m^B`` the median scale of the
last ``PLAIN_SAMPLES`` timed (one plain step's time is noisy too). Without a
measured profile ``t_ref`` is 1 s, and ``m^B`` is the plain step in seconds.
A record judged on the profile's step before any timing is rescaled, once,
when ``MIN_PLAIN_SAMPLES`` plain steps at ``B`` are timed::

    K <- K / m^B

Steps judged against timed plain steps are never rescaled: each was judged
against the plain step of its own time and context.

A gate closed on a stale basis reopens as soon as the rescaled record clears
``min_speedup`` by ``REOPEN_MARGIN``: closing costs the few plain steps that
timed it. The margin is hysteresis against the median's own noise: it moves
by a few percent from one plain step to the next, and at B=8 on the 2-core AMD
EPYC, where drafting is at break-even, a record closed at 0.97-1.0 reopened on
it three times in 128 steps, drafting 7-14 steps each time.
Within the margin the closed gate keeps its probe schedule.

An open gate times no plain steps, so a record that reads about break-even
against the profile's plain step could stay wrong: at MT-bench B=4 on the
2-core Intel Xeon, plain steps ran 7 % faster than profiled, and a gate reading
1.0x drafted nearly every step at 0.93x vanilla. Near break-even a plain
step costs about nothing, so while ``rho^B`` is within ``TIMING_MARGIN`` of
``min_speedup`` on the profile's basis, the gate decodes plainly at ``B``
until ``MIN_PLAIN_SAMPLES`` plain steps are timed, and judges on from there.

For the same reason a timed basis goes stale while the gate drafts every step:
the machine's speed drifts (on the 2-core AMD EPYC, plain steps read
``t / t_ref`` 1.17 in one dataset's first group and 0.95-1.01 twenty minutes
later, and the next dataset's drafted steps, judged against 1.17, read
ρ 1.2-1.4 where the wall clock gave 0.75-0.97x). So once a batch size has
drafted ``RETIME_HORIZON`` plain steps' worth of time since its last timed
plain step (never timed: since it began, on the profile's basis), its old
timings are dropped and it decodes plainly until ``MIN_PLAIN_SAMPLES`` fresh
ones are timed (the first plain step after a drafted one is not timed,
``cast_core.policy.PlainStep``); a record on the profile's basis is then
rescaled as above. Four plain steps per horizon: about 0.3 % of the time at
ρ 1.2, 0.8 % at ρ 2.

A batch size seen for the first time starts from the record of the nearest
one judged within a factor 2 (sequences finishing one by one walk a batch
through every size below it; each would otherwise pay a probe), worth a
quarter of a window (``INHERITED_SHARE``), so that its own steps soon
outweigh it. A closed neighbour within ``SHARED_SKIP`` of its size also
hands on its skip countdown and backoff: on the 2-core Intel Xeon a batch of 8
MT-bench rows finishing one by one paid a failing probe at 8, 7, 6, ...
(0.95x vanilla), where one schedule carried down the sizes probes as rarely
as the closed gate at 8. A closed neighbour further off (half or twice the
size) is weaker evidence, and the new size probes after 2 steps. A closed
neighbour's judged count comes along (its closing carries over); an open
neighbour's does not, so the new size may close on its own first
``min_judged`` rows: ``rho`` falls as ``B`` grows, and at HumanEval B=8
(2-core AMD EPYC) a record inherited open from B=4 at about 1.05x drafted 6
steps at a loss before its own steps pulled it under 1.0 (0.93x vanilla).
A neighbour open below break-even (past ``min_judged``, thinning) hands on
its whole record, moments and judged count included, scaled like the prior
(every step's weight ``w_i`` times the same factor, which keeps ``rho`` and
``S / K``): the new size thins as its neighbour does, on the same budget,
instead of drafting its first ``min_judged`` rows unconditionally. At B=16
on the 2-core Intel Xeon with AMX, rows finishing one by one walked a
thinning record at 0.76x (``S / K`` 0.15) through 14, 13, ..., and each new
size drafted its first ``min_judged`` rows unconditionally, most of them at a
loss (``bench/results/b16/``).

A record is only as current as its last judged step. One that thins at a
small chance, or is closed, may go hundreds of steps without one while a
neighbour's record moves on: on the 2-core AMD EPYC, B=7 started from B=8's
record thinning at 0.84 in the warm-up and never drafted again, while B=8's
own steps lifted it to 1.45; MT-bench rows end by EOS, so its batches spent
most of each group at B=7 and below, plain (5-25 % of row steps drafted,
0.95x vanilla pooled). So a record no step was judged by for
``RECORD_HORIZON`` plain steps' worth of time, at any batch size (a closed
one: that plus its skip schedule's backoff), gives way to its nearest fresh
neighbour's as a new size's does (keeping its plain step timings); without
a fresh neighbour within a factor 2 it stays.

Plain decoding is ``rho = 1`` by definition. At batch size ``B`` the gate
lets the drafter run while ``rho^B >= min_speedup``, and until ``min_judged``
drafted *row* steps were judged there (a drafted step at ``B`` judges ``B``
rows, so ``ceil(min_judged / B)`` steps: 16 at B=1, 4 at B=4, 2 at B=8): the
first trees, planned before any acceptance was seen, are the least tuned,
and one row's unlucky tree alone must not shut drafting off for hundreds of
steps. A batch's first steps judge the mean over all its rows (all have
their whole budget left), so their noise shrinks with ``B``, while learning
costs more where drafting pays least: at B=8 on the
2-core AMD EPYC, 8 judged steps at 0.8x lost 2.4 s of a 36 s HumanEval group.
With 8 rows (2 steps at B=4), MT-bench B=4 closed on the 8-token warm-up's
two steps, the first feeding whole prompts.

Past ``min_judged``, while ``rho^B < min_speedup`` but the gate is not closed
(below), drafting is thinned to the chance that it pays,
``P = Q((min_speedup K - T) / S; n_eff - 1)`` (``P(rho > min_speedup)``,
Student's t upper tail ``Q``, below), taken as a share of *time*. A drafted step takes
``C_bar = sum_i w_i C_i / sum_i w_i`` plain steps (the mean over the steps
judged here), so drafting a share ``p`` of the steps spends
``p C_bar / (1 - p + p C_bar)`` of the time drafting, which is ``P`` for::

    p = P / (C_bar - (C_bar - 1) P)        (C_bar at least 1)

A step drafts when the running sum of ``p`` reaches 1, and is plain
otherwise. A record between break-even and its closing bound would otherwise
draft every step at an expected loss: at HumanEval B=8 on the Intel Xeon
with AMX, steps committing 1 to 10 tokens held ``S / K`` at 0.1-0.15, and
the gate drafted 16 steps at 0.8-1.0x before closing, the group running
0.76x vanilla. Thinned by steps rather than time, a drafted step costing 4-5
plain ones (B=8 on the 2-core AMD EPYC) put several times ``P`` of the time
into drafting: run after HumanEval in one process, whose record it carried
over, an MT-bench B=8 group drafted 50 steps and ran 0.91x vanilla (10
steps, 0.93x, thinned by time; tuning prompts,
``bench/results/timeshare_ab/``). Thinned, the plain steps between cost
nothing beyond their own time, are timed, and the record recovers through
the steps that still draft where drafting pays.

Thinned steps draft at an expected loss, so their loss is budgeted like a
closed gate's probes: each thinned step, once judged, adds
``C_full - n / min_speedup`` plain steps to a loss ``L`` (a gain subtracts,
to no less than 0), ``C_full`` being its whole wall time, the catch-up of the
plain steps before it included; every step at any batch size adds its plain
steps' worth of time (1 for a plain step, ``C_full`` for a drafted one) to
``E``, both decaying as ``exp(-C / THIN_HORIZON)``, and a step thins (drafts
on its share) only while ``L <= probe_budget * E``. On the 2-core Intel Xeon
with AMX about 20 % slower than its profile, MT-bench B=8 with 11 % of row
steps drafted this way ran 0.94x vanilla (pairs 0.90-0.99x;
``bench/results/floor_xeon_amx_slow_4c9c637.json``). Judged with that
catch-up in ``C`` (the rule before ``bench/results/backlog_ab/``), a thinning record
read below what drafting every step gets (10-20 backlog tokens a row at B=8,
0.5-1.1 plain steps of the 2-core AMD EPYC), and a gate the warm-up's first
trees had thinned or closed stayed so for a group or two.

Past ``min_judged``, the gate closes only where ``rho^B`` is below
``min_speedup`` with the one-sided confidence ``Phi(z)`` of ``z``
(``close_confidence``) standard errors of a normal::

    T + t S < min_speedup K      S^2 = n_eff / (n_eff - 1) * sum_i w_i^2 (n_i - rho^B C_i)^2
                                 n_eff = (sum_i w_i)^2 / sum_i w_i^2
                                 Q(t; n_eff - 1) = Phi(-z)

with ``w_i`` the steps' decayed weights (``S / K`` is the delta-method
standard error of the ratio ``T / K``) and ``Q(t; nu)`` the upper tail of
Student's t with ``nu`` degrees of freedom (``cast_core.student_t``): ``S``
is estimated from the same few steps, so its ratio to the true error
scatters, by a chi distribution with ``n_eff - 1`` degrees of freedom. With
``z = 2``, ``t`` is 14.0 standard errors on two steps' weight, 3.3 on four,
2.1 on 32. Taken as normal (``t = z``), two steps that happened to agree
closed the gate at B=8 on the 2-core AMD EPYC at 0.994x and 0.987x with
``S / K`` 0.001-0.005, and the warm-up's two prior-sized trees closed it in
3 of 10 warm-ups against the fresh steps' 1.07-1.45x in the others
(``bench/results/backlog_ab/``). The sums run over the steps judged
at ``B`` (and those of a thinning neighbour, inherited scaled): an
inherited prior moves ``rho^B``, not ``S``, and on one step
``S = 0``, so ``min_judged`` alone says how much a first step must show:
at B=16 one step judges 16 rows and closes on its point estimate. Asking
for a second step before closing or thinning cost B=16 on the 2-core AMD
EPYC 1-6 % (9 of 12 interleaved pairs slower): the first step read
0.53-0.58x and closed the gate, where the second turned it into one that
thinned at 0.9x (``bench/results/two_step_gate_ab/``).
How far one step's tokens stray depends on the tree: small trees commit
1-3 tokens a step, and a few more steps pin ``rho^B`` down; the deep trees a
cheap drafter buys commit 1 to 11, and at HumanEval B=2
on the 2-core AMD EPYC six such steps read 0.69x and closed the gate for
the rest of the group, where the same groups with the gate held open ran
1.04-1.36x vanilla. Steps that lose steadily (B=8) have a small ``S`` and
close as soon as before.

Closed, the gate skips ``s`` steps, then probes with one drafted step. A
failing probe costs ``C_full - 1`` plain steps, so ``s = (C_full - 1) /
probe_budget`` (at least twice the previous ``s``, at most ``max_skip``)
keeps the time lost to probing near ``probe_budget``. A probe that pays
(``n >= min_speedup C``, its window of the skipped tokens left out) hands the
decision back to the closing test; one that fails keeps the gate closed
(shut) whatever the spread says, until a probe pays or timed plain steps
rescale the record open. The closing test alone would reopen it: a gate
closed on its first judged step (``S = 0`` on one step, so it closes on the
point estimate) gains a spread from the probe's step (``n_eff`` about 2),
and ``T + t S`` can clear ``min_speedup K`` though both steps lost. At B=16
on the 2-core Intel Xeon with AMX, a probe at 0.99x (``n`` 2.31, ``C`` 2.33)
turned a gate closed at 0.6x into a thinning one at 0.90x (``S / K`` 0.08),
and it and a size below that inherited its record drafted 3 thinned steps at
0.57-0.82x in the next groups (``bench/results/b16/``). A new size under a
closed neighbour starts shut too.

A probe must not cost more the longer the gate stayed closed: the drafter
would otherwise catch up on every skipped token (at batch size ``B``, ``s``
skipped steps put ``B * s`` tokens through it). Nor should a row new to the
drafter always feed it its whole prompt: at B=8 on the 2-core Intel Xeon, 8
code prompts took the 0.5B drafter 13 s of a 78 s run for 3 drafted steps.
A long catch-up (a backlog, a prompt) fed whole is an investment. Windowed,
a drafted step feeds at most ``probe_context`` of a row's most recent
tokens, plus the row's first ``SINK_TOKENS`` when its cache is still empty
(models lean on their first tokens as attention sinks); the rest is skipped
over as a gap in its cache (``KVState.skip_positions``): drafts may get
worse for it, never wrong. Fed whole, the catch-up forward costs

    dC = C(whole) - C(window)            plain steps more (profile, ``catch_up_cost``)

each ``C`` as the drafter feeds the chains: one forward padded to the
longest, ``C_D(B, L)``, or the prompts of rows new to the drafter each
alone where that is cheaper (``cast_core.drafter._rows_fed_apart``)

and buys drafts from the whole context for the ``N`` tokens the cut rows
have left (their mean; ``RowPlan.tokens_left``). Drafting at ``rho^B``
spends ``N / rho^B`` plain steps' worth of time on them instead of ``N``, so
an open gate feeds whole iff

    (1 - 1 / rho^B) * N >= dC

taking a window to buy nothing, which leans towards feeding whole. A closed
gate's probes are windowed (drafting does not go on to repay a whole feed
unless the probe reopens the gate); with nothing known at ``B`` yet, the
first drafted step feeds whole. The same 8 code prompts (up to 265 tokens)
cost ``dC`` = 37 plain steps at B=8 padded, where 128 tokens at 1.05x buy 6;
4 of up to 157 tokens cost 13 at B=4, where 128 tokens at 1.18x buy 19. Only
long catch-ups are cut: a step's own new tokens are fewer than a window.

``rho^B`` also serves as the scale of CAST's thresholds (``threshold_scale``):
a node is worth adding when its marginal tokens per marginal cost beat the
speedup already achieved, not merely 1 (the optimum of ``(1 + U) / C`` has
``dU / dC = (1 + U) / C``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cast_core.student_t import upper_quantile, upper_tail

#: DEBUG: each drafted step's decision and each judged step (``cast bench run --trace-gate``)
logger = logging.getLogger(__name__)

#: first tokens of a row a probe feeds the drafter when its cache is empty
SINK_TOKENS = 4

#: weight of a neighbour's record in a new batch size's, in windows
INHERITED_SHARE = 0.25

#: smallest size ratio at which a new batch size takes over a closed neighbour's skip countdown
SHARED_SKIP = 0.75

#: plain step times whose median is ``t_plain^B``; how many before it rescales the record
PLAIN_SAMPLES, MIN_PLAIN_SAMPLES = 5, 3

#: relative distance from ``min_speedup`` within which a record on the profile's basis times plain steps
TIMING_MARGIN = 0.15

#: relative margin over ``min_speedup`` a closed record must reach, when plain step timings rescale it, to reopen
REOPEN_MARGIN = 0.05

#: plain steps' worth of time over which thinned steps' loss is weighed against ``probe_budget`` (as long as ``max_skip``)
THIN_HORIZON = 256.0

#: plain steps' worth of drafted time at a batch size after which its plain step timings are taken afresh
RETIME_HORIZON = 256.0

#: plain steps' worth of time (at any batch size) after which a record no step was judged by gives way to a fresh neighbour's
RECORD_HORIZON = 256.0


@dataclass
class _BatchGate:
    """Gate state of one batch size."""

    tokens: float = 0.0
    cost: float = 0.0
    judged: int = 0  # row steps judged here, plus a closed neighbour's on inheritance
    # moments of the steps judged here: sums of w, w C (the thinning's mean cost, ``DraftGate._step_share``),
    # and for the closing test (``DraftGate._closed``) w^2, w^2 n^2, w^2 n C, w^2 C^2
    weight: float = 0.0
    own_cost: float = 0.0
    weight_sq: float = 0.0
    tokens_sq: float = 0.0
    cross: float = 0.0
    cost_sq: float = 0.0
    plain_scales: deque[float] = field(default_factory=lambda: deque(maxlen=PLAIN_SAMPLES))  # t / t_ref per timed plain step
    on_profile: bool = False  # the last judged step's C divided by the profile's plain step (rescaled once timings come)
    skip_left: int = 0
    backoff: int = 0
    shut: bool = False  # a probe failed here: closed whatever the spread, until a probe pays or a rescale reopens it
    draft_credit: float = 0.0  # running sum of p (``DraftGate._step_share``) over the steps thinned below break-even
    thinned: bool = False  # the last drafted step here was thinned (its loss counts against the budget when judged)
    drafted_since_timing: float = 0.0  # plain steps' worth of drafted time judged here since the last timed plain step
    retiming: bool = False  # its timings were dropped as stale; plain until ``MIN_PLAIN_SAMPLES`` fresh ones come
    judged_at: float = 0.0  # ``DraftGate._clock`` at its last judged step, or when it started

    @property
    def has_record(self) -> bool:
        """Whether drafted steps were judged here or inherited from a neighbour (``K > 0``)."""
        return self.cost > 0

    @property
    def plain_scale(self) -> float | None:
        """``m^B``: median of the recent plain steps' ``t / t_ref`` (None before ``MIN_PLAIN_SAMPLES``)."""
        return statistics.median(self.plain_scales) if len(self.plain_scales) >= MIN_PLAIN_SAMPLES else None

    def add(self, tokens: float, cost: float, decay: float) -> None:
        """Age the record by ``decay`` and add a step of ``tokens`` for ``cost``."""
        d2 = decay**2
        self.tokens, self.cost = decay * self.tokens + tokens, decay * self.cost + cost
        self.weight, self.weight_sq = decay * self.weight + 1.0, d2 * self.weight_sq + 1.0
        self.own_cost = decay * self.own_cost + cost
        self.tokens_sq = d2 * self.tokens_sq + tokens**2
        self.cross = d2 * self.cross + tokens * cost
        self.cost_sq = d2 * self.cost_sq + cost**2

    def scaled(self, weight: float) -> "_BatchGate":
        """A new record with this one's steps, each weight ``w_i`` times ``weight``: ``T``, ``K``, ``sum w``,
        ``sum w C`` times ``weight``, the squared moments times ``weight^2``, so ``rho``, ``n_eff`` and ``S / K``
        stay; the judged count comes along (no skip state or plain times)."""
        w2 = weight**2
        return _BatchGate(
            tokens=self.tokens * weight,
            cost=self.cost * weight,
            judged=self.judged,
            weight=self.weight * weight,
            own_cost=self.own_cost * weight,
            weight_sq=self.weight_sq * w2,
            tokens_sq=self.tokens_sq * w2,
            cross=self.cross * w2,
            cost_sq=self.cost_sq * w2,
        )

    def prior(self, weight: float) -> "_BatchGate":
        """A new record starting from this one's ``T`` and ``K`` times ``weight``: a prior for ``rho``
        that adds no steps to judge the spread by (no moments, skip state or plain times)."""
        return _BatchGate(tokens=self.tokens * weight, cost=self.cost * weight)

    def rescale_costs(self, factor: float) -> None:
        """Every step's ``C`` times ``factor`` (a new plain-step basis)."""
        self.cost, self.own_cost = self.cost * factor, self.own_cost * factor
        self.cross, self.cost_sq = self.cross * factor, self.cost_sq * factor**2

    @property
    def effective_steps(self) -> float:
        """``n_eff = (sum w_i)^2 / sum w_i^2``: how many equally weighted steps the record's are worth (0 before any)."""
        return self.weight**2 / self.weight_sq if self.weight_sq > 0 else 0.0

    def tokens_spread(self) -> float:
        """``S``: the standard error of ``T`` about ``rho^B K`` (0 with one step's weight or less: nothing to judge its spread by).

        With step weights ``w_i`` and residuals ``e_i = n_i - rho C_i``,
        ``S^2 = n_eff / (n_eff - 1) * sum w_i^2 e_i^2`` and ``n_eff = (sum w_i)^2 / sum w_i^2``
        (the delta method for a ratio of weighted sums: ``SE(rho^B) = S / K``).
        """
        n_eff = self.effective_steps
        if n_eff <= 1.0 + 1e-9:
            return 0.0
        rho = self.tokens / self.cost
        residual = max(0.0, self.tokens_sq - 2.0 * rho * self.cross + rho**2 * self.cost_sq)
        return math.sqrt(n_eff / (n_eff - 1.0) * residual)


@dataclass
class DraftGate:
    """Per-batch-size record of achieved speedup and plain step time, and the draft/skip decision."""

    min_speedup: float = 1.0
    max_skip: int = 256
    window: float = 32.0
    probe_budget: float = 0.01
    probe_context: int = 16
    min_judged: int = 16
    close_confidence: float = 2.0
    _by_batch: dict[int, _BatchGate] = field(default_factory=dict)
    _thin_loss: float = 0.0  # L: decayed plain steps lost by judged thinned steps
    _elapsed: float = 0.0  # E: decayed plain steps' worth of time of every step
    _clock: float = 0.0  # plain steps' worth of time of every step so far

    def __post_init__(self) -> None:
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0; got {self.min_speedup}")
        if self.max_skip < 1:
            raise ValueError(f"max_skip must be >= 1; got {self.max_skip}")
        if self.window <= 0:
            raise ValueError(f"window must be > 0; got {self.window}")
        if not 0 < self.probe_budget <= 1:
            raise ValueError(f"probe_budget must be in (0, 1]; got {self.probe_budget}")
        if self.min_judged < 1:
            raise ValueError(f"min_judged must be >= 1; got {self.min_judged}")
        if self.close_confidence < 0:
            raise ValueError(f"close_confidence must be >= 0; got {self.close_confidence}")
        if self.probe_context < 1:
            raise ValueError(f"probe_context must be >= 1; got {self.probe_context}")

    def _at(self, batch_size: int) -> _BatchGate:
        """The record of ``batch_size``. A new one starts from the nearest batch size with a fresh record within a
        factor 2; so does one that no step was judged by for ``RECORD_HORIZON`` plain steps' worth of time, where
        such a neighbour exists (keeping its plain step timings)."""
        gate = self._by_batch.get(batch_size)
        if gate is not None and self._fresh(gate):
            return gate
        near = [
            b
            for b, g in self._by_batch.items()
            if b != batch_size and g.has_record and self._fresh(g) and b <= 2 * batch_size and batch_size <= 2 * b
        ]
        if gate is not None and not near:
            return gate
        new = _BatchGate()
        if near:
            near_b = min(near, key=lambda b: (abs(b - batch_size), b))
            nearest = self._by_batch[near_b]
            # rho is a ratio, a prior across batch sizes (it falls as B grows); its basis (plain seconds at another size) is not
            share = min(1.0, INHERITED_SHARE * self.window / nearest.cost)
            new = nearest.scaled(share) if self._thinning(nearest) else nearest.prior(share)
            if self._closed(nearest):
                new.judged, new.shut = nearest.judged, True
                shared = min(near_b, batch_size) >= SHARED_SKIP * max(near_b, batch_size)
                new.skip_left, new.backoff = (nearest.skip_left, nearest.backoff) if shared else (2, 2)
        new.judged_at = self._clock
        if gate is not None:  # a stale record gives way; its plain step timings stay
            new.plain_scales, new.drafted_since_timing, new.retiming = gate.plain_scales, gate.drafted_since_timing, gate.retiming
            logger.debug("forgot B=%d rho=%s for B=%d's", batch_size, f"{self._rho(gate):.3f}" if gate.has_record else "none", near_b)
        self._by_batch[batch_size] = new
        return new

    def _fresh(self, gate: _BatchGate) -> bool:
        """Whether a step was judged by ``gate`` (or it started) within ``RECORD_HORIZON`` plain steps' worth of time,
        plus its skip schedule's ``backoff`` where it is closed (its next probe is that many of its own steps away)."""
        return self._clock - gate.judged_at <= RECORD_HORIZON + gate.backoff

    @staticmethod
    def _rho(gate: _BatchGate) -> float | None:
        return gate.tokens / gate.cost if gate.has_record else None

    def _thinning(self, gate: _BatchGate) -> bool:
        """Open past ``min_judged`` below break-even: ``rho^B < min_speedup``, but not confidently (``_closed``)."""
        rho = self._rho(gate)
        return rho is not None and rho < self.min_speedup and gate.judged >= self.min_judged and not self._closed(gate)

    @property
    def _close_tail(self) -> float:
        """``Phi(-z)``: the chance to pay below which the gate closes (1/2 at ``z = 0``: the point estimate)."""
        return 0.5 * math.erfc(self.close_confidence / math.sqrt(2.0))

    def _margin(self, gate: _BatchGate) -> float:
        """``t S``, ``Q(t; n_eff - 1) = Phi(-z)``: the closing test's margin, ``T + t S < min_speedup K``
        (0 without a spread to judge by)."""
        spread = gate.tokens_spread()
        if spread <= 0 or self.close_confidence == 0:
            return 0.0
        return upper_quantile(self._close_tail, gate.effective_steps - 1.0) * spread

    def _pay_chance(self, gate: _BatchGate) -> float:
        """``P(rho > min_speedup) = Q((min_speedup K - T) / S; n_eff - 1)``, Student's t upper tail: 1 where
        ``rho^B >= min_speedup`` (or no record), 0 below it without a spread to judge by."""
        deficit = self.min_speedup * gate.cost - gate.tokens
        if deficit <= 0:
            return 1.0
        spread = gate.tokens_spread()
        return upper_tail(deficit / spread, gate.effective_steps - 1.0) if spread > 0 else 0.0

    def _closed(self, gate: _BatchGate) -> bool:
        """Shut by a failing probe, or ``judged >= min_judged`` and ``T + t S < min_speedup K``: ``rho^B`` is below
        ``min_speedup`` with confidence ``Phi(z)``, read as ``_pay_chance < Phi(-z)`` (``Q`` falls as its
        argument grows, so one tail stands for the quantile ``t``)."""
        if gate.shut:
            return True
        return gate.judged >= self.min_judged and self._pay_chance(gate) < self._close_tail

    def speedup(self, batch_size: int) -> float | None:
        """``rho^B = T / K``: the windowed speedup of drafted steps at ``batch_size`` (None before any)."""
        return self._rho(self._at(batch_size))

    def speedup_error(self, batch_size: int) -> float | None:
        """``S / K``: the standard error of ``rho^B`` over the steps judged at ``batch_size`` (None before any record)."""
        gate = self._at(batch_size)
        return gate.tokens_spread() / gate.cost if gate.has_record else None

    def plain_scale(self, batch_size: int) -> float | None:
        """``m^B``: median over recent plain (skipped) steps at ``batch_size`` of their wall time over the profile's
        plain step at their context (over 1 s without a profile: their seconds); None before ``MIN_PLAIN_SAMPLES``.
        A drafted step at context ``ctx`` is judged against ``m^B * t_ref(B, ctx)``."""
        return self._at(batch_size).plain_scale

    def threshold_scale(self, batch_size: int) -> float:
        """``max(1, rho^B)``: what a marginal node must beat, in tokens per target step."""
        rho = self.speedup(batch_size)
        return 1.0 if rho is None else max(1.0, rho)

    def is_closed(self, batch_size: int) -> bool:
        """Whether drafted steps at ``batch_size`` fell below ``min_speedup``."""
        return self._closed(self._at(batch_size))

    def windows_catch_up(self, batch_size: int, tokens_left: float, extra_cost: float) -> bool:
        """Whether a drafted step at ``batch_size`` feeds long catch-ups through ``probe_window``.

        ``tokens_left``: ``N``, mean tokens the cut rows have left (``math.inf``: unbounded);
        ``extra_cost``: ``dC``, plain steps feeding them whole costs over the window.
        False (feed whole) iff nothing is known at ``batch_size``, or the gate is open there and
        ``(1 - 1 / rho_low) * N >= dC`` with ``rho_low = (T - t S) / K``: ``rho^B`` less the closing
        test's margin (``_margin``).
        """
        gate = self._at(batch_size)
        if not gate.has_record:
            return False
        if self._closed(gate):
            return True
        rho_low = (gate.tokens - self._margin(gate)) / gate.cost
        gain = (1.0 - 1.0 / rho_low) * tokens_left if rho_low > 1.0 else 0.0
        return gain < extra_cost

    def catch_up(
        self,
        batch_size: int,
        chains: list[list[int]],
        cached: list[int],
        tokens_left: list[float],
        catch_up_cost: Callable[[list[list[int]], list[tuple[int, int]] | None], float],
    ) -> tuple[list[list[int]], list[tuple[int, int]] | None]:
        """What a drafted step at ``batch_size`` feeds of each row's catch-up chain: the chains whole
        (gaps None), or ``probe_window``'s cut where ``windows_catch_up`` says feeding them whole does not pay.

        ``cached[b]``: tokens row ``b`` has in the drafter's cache; ``tokens_left[b]``: tokens it may still
        commit (``math.inf``: unbounded); ``catch_up_cost(chains, gaps)``: the catch-up forward feeding
        ``chains`` (``gaps``: as ``probe_window`` returns them; None: whole) in plain steps.
        """
        fed, gaps = self.probe_window(chains, cached)
        cut = [left for left, (_, skipped) in zip(tokens_left, gaps) if skipped]
        if not cut:
            return chains, None
        extra = catch_up_cost(chains, None) - catch_up_cost(fed, gaps)
        if self.windows_catch_up(batch_size, sum(cut) / len(cut), extra):
            return fed, gaps
        return chains, None

    def probe_window(self, chains: list[list[int]], cached: list[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """What a windowed step (``windows_catch_up``) feeds of each row's catch-up chain, and the gap it leaves.

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

    def draft_chance(self, batch_size: int) -> float:
        """``P(rho > min_speedup)``: 1 while ``rho^B >= min_speedup`` or fewer than ``min_judged`` rows were judged,
        else ``Q((min_speedup K - T) / S; n_eff - 1)``, Student's t upper tail (0 without spread to judge by)."""
        gate = self._at(batch_size)
        return 1.0 if gate.judged < self.min_judged else self._pay_chance(gate)

    def should_draft(self, batch_size: int) -> bool:
        """Whether this step at ``batch_size`` drafts (a skipped step counts down to the next probe; near
        break-even on the profile's basis, steps are plain until ``MIN_PLAIN_SAMPLES`` are timed; below
        break-even, an open gate drafts when the running sum of ``_step_share(draft_chance)`` reaches 1, while
        the thinned steps' loss is within budget, ``L <= probe_budget * E``)."""
        gate = self._at(batch_size)
        if gate.skip_left > 0:
            gate.skip_left -= 1
            return self._plain()
        if self._needs_timing(gate) or self._retiming(gate):
            return self._plain()
        chance = 1.0 if self._closed(gate) else self.draft_chance(batch_size)  # a closed gate's probe is due
        if chance >= 1.0:
            gate.draft_credit, gate.thinned = 0.0, False
            self._log_draft(batch_size, gate)
            return True
        if self._thin_loss > self.probe_budget * self._elapsed:  # thinning has lost its share of the time
            return self._plain()
        gate.draft_credit += self._step_share(gate, chance)
        if gate.draft_credit < 1.0:
            return self._plain()
        gate.draft_credit -= 1.0
        gate.thinned = True
        self._log_draft(batch_size, gate)
        return True

    def _log_draft(self, batch_size: int, gate: _BatchGate) -> None:
        """DEBUG: a step at ``batch_size`` drafts."""
        if logger.isEnabledFor(logging.DEBUG):
            rho = self._rho(gate)
            logger.debug(
                "draft B=%d rho=%s judged=%d thinned=%s closed=%s",
                batch_size, "none" if rho is None else f"{rho:.3f}", gate.judged, gate.thinned, self._closed(gate),
            )

    def _age(self, plain_steps: float) -> None:
        """Add ``plain_steps`` of time to ``E`` and the clock, decaying ``L`` and ``E`` by ``exp(-plain_steps / THIN_HORIZON)``."""
        decay = math.exp(-plain_steps / THIN_HORIZON)
        self._thin_loss *= decay
        self._elapsed = decay * self._elapsed + plain_steps
        self._clock += plain_steps

    def _plain(self) -> bool:
        """A plain step: one plain step's time to ``E``; returns False (do not draft)."""
        self._age(1.0)
        return False

    @staticmethod
    def _step_share(gate: _BatchGate, time_share: float) -> float:
        """``p = P / (C_bar - (C_bar - 1) P)``: the share of steps that drafts a share ``P`` of the time,
        a drafted step costing ``C_bar = max(1, sum_i w_i C_i / sum_i w_i)`` plain steps (the mean over the steps
        judged here)."""
        mean_cost = max(1.0, gate.own_cost / gate.weight) if gate.weight > 0 else 1.0
        return time_share / (mean_cost - (mean_cost - 1.0) * time_share)

    def _needs_timing(self, gate: _BatchGate) -> bool:
        """Whether ``gate`` judges on an untimed (profiled) plain step with ``rho^B`` within ``TIMING_MARGIN`` of ``min_speedup``."""
        rho = self._rho(gate)
        if rho is None or not gate.on_profile or gate.plain_scale is not None:
            return False
        return abs(rho / self.min_speedup - 1.0) < TIMING_MARGIN

    @staticmethod
    def _retiming(gate: _BatchGate) -> bool:
        """Whether ``gate``'s plain step is being timed afresh: once ``RETIME_HORIZON`` plain steps' worth of time
        was drafted since its last timed plain step (or since it began, on the profile's basis), its timings are
        dropped, and its steps are plain until ``MIN_PLAIN_SAMPLES`` fresh ones are timed (a record on the profile's
        basis is then rescaled, ``observe_plain``)."""
        if not gate.retiming and gate.drafted_since_timing >= RETIME_HORIZON:
            gate.retiming = True
            gate.plain_scales.clear()
        return gate.retiming

    def observe_plain(self, batch_size: int, seconds: float, reference_s: float = 1.0) -> None:
        """Record the wall time of one plain step at ``batch_size`` as ``seconds / reference_s`` (``reference_s``: the
        profile's plain step at the step's context, ``t_ref``; 1 without a profile); rescale a record judged on the
        profile to ``m^B``.

        ``K <- K / m^B``, once, when ``MIN_PLAIN_SAMPLES`` are timed; where that lifts ``rho^B`` to
        ``(1 + REOPEN_MARGIN) * min_speedup`` or more, the gate stops skipping. Steps judged against timed plain
        steps are never rescaled: each was judged against the plain step of its own time, and the plain step
        grows with the context (at B=8 on the Intel Xeon with AMX, 0.25 s at a HumanEval batch's start, 0.29 s
        100 steps on), so rescaling them by a later median would read drafting's gain high by as much.
        """
        if seconds <= 0 or reference_s <= 0:
            return
        gate = self._at(batch_size)
        gate.plain_scales.append(seconds / reference_s)
        scale = gate.plain_scale
        gate.drafted_since_timing = 0.0
        if scale is not None:
            gate.retiming = False
        if gate.has_record and gate.on_profile and scale is not None:
            gate.rescale_costs(1.0 / scale)
            gate.on_profile = False
            if gate.tokens >= (1.0 + REOPEN_MARGIN) * self.min_speedup * gate.cost:
                gate.skip_left = gate.backoff = 0
                gate.shut = False

    def observe(self, batch_size: int, tokens: float, cost: float, on_profile: bool = False, full_cost: float | None = None) -> None:
        """Record one drafted step at ``batch_size`` (``batch_size`` judged row steps); open or close the gate.

        ``tokens``: ``n``, tokens it committed per row; ``cost``: its ``C`` in plain steps, without the
        backlog of plain steps before it; ``full_cost``: with it (None: ``cost``), the time the step took,
        which ages the clock and counts against thinning's budget and a probe's skip;
        ``on_profile``: whether ``C`` divides by the profile's plain step (rescaled by ``m^B`` once plain
        steps are timed; False: judged against timed plain steps, or a predicted cost, never rescaled).
        ``T, K <- d T + n, d K + C`` with ``d = exp(-C / window)``.
        """
        full_cost = cost if full_cost is None else full_cost
        if tokens < 0 or cost <= 0 or full_cost < cost:
            raise ValueError(f"tokens must be >= 0, cost > 0 and full_cost >= cost; got {tokens}, {cost}, {full_cost}")
        gate = self._at(batch_size)
        probe, thinned = self._closed(gate), gate.thinned
        gate.add(tokens, cost, math.exp(-cost / self.window))
        gate.judged += batch_size
        gate.judged_at = self._clock
        gate.drafted_since_timing += full_cost
        gate.shut = probe and tokens < self.min_speedup * cost
        self._age(full_cost)
        if gate.thinned:
            self._thin_loss = max(0.0, self._thin_loss + full_cost - tokens / self.min_speedup)
            gate.thinned = False
        gate.on_profile = on_profile
        if not self._closed(gate):
            gate.backoff = 0
        elif gate.skip_left == 0:
            wanted = math.ceil(max(0.0, full_cost - 1.0) / self.probe_budget)
            gate.backoff = min(self.max_skip, max(2, 2 * gate.backoff, wanted))
            gate.skip_left = gate.backoff
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "judged B=%d n=%.2f C=%.2f full=%.2f prof=%s probe=%s thinned=%s rho=%.3f se=%.3f judged=%d closed=%s skip=%d "
                "backoff=%d L=%.2f E=%.1f scales=%s",
                batch_size, tokens, cost, full_cost, on_profile, probe, thinned, gate.tokens / gate.cost, gate.tokens_spread() / gate.cost,
                gate.judged, self._closed(gate), gate.skip_left, gate.backoff, self._thin_loss, self._elapsed,
                [round(x, 2) for x in gate.plain_scales],
            )
