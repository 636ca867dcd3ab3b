"""Tree-shaping policies: how wide, how deep, and how many nodes to verify.

The drafter builds a tree layer by layer. Layer 1 holds the ``top_k`` most
likely children of the root; every later layer holds the ``top_k`` children
(by path confidence ``v``) of the previous layer's expanded nodes. A policy
answers three questions, each for a whole batch at once (a padded forward
costs what its largest row costs, so rows are sized together and utilities
are averaged over the batch):

1. ``layer_width``: of layer ``i``'s candidates (sorted by ``v``), how many to keep.
2. ``grow``: whether to expand the kept nodes into layer ``i + 1``.
3. ``verify_count``: how many drafted nodes, best ``v`` first, go to the verifier.

Policies:

* ``none``   — no drafting: plain autoregressive decoding through the same engine.
* ``static`` — EAGLE-2: keep ``top_k`` per layer, grow to a fixed ``depth``,
  verify the ``total_tokens`` most confident nodes.
* ``cast``   — CAST (Hong, Tan & Hu, ICLR 2026): the same questions answered
  from measured costs. Costs are in units of one plain target decode step,
  ``f_T(B, ctx, 1)``; utilities are expected accepted tokens (sums of ``v``).

  *Breadth*: ``u_k = sum_{s<=k} v(s)``, ``c_k = f_D(B, ctx, k) / f_T(B, ctx, 1)``,
  ``u_0 = c_0 = 0``; ``n_i = algorithm1(u, c, C1)``.

  *Depth*: grow layer ``i + 1`` iff for some ``k`` its ``k`` best nodes pay
  for the forward and their verification, ``alpha * U_k^(i) >= C2 *
  c_k^(i)``, with ``alpha`` the mean of the last ``R`` observed gain ratios
  ``phi = u^(i+1) / u^(i)`` of kept utilities (a FIFO per sequence,
  initialised to ``{1}``; the batch uses the mean over its rows). Beyond the
  paper, whose price is the drafter forward alone (``alpha * u^(i) / c^(i) >=
  C2``), the price includes verifying the new layer's nodes that the gain
  counts: a layer's drafts are worth something only once verified.
  ``U_k^(i)`` is the mean row's sum of its ``k`` largest kept ``v`` in layer
  ``i`` (``U_{n_i}^(i) = u^(i)``, the layer's kept utility) and
  ``c_k^(i) = (f_D(B, ctx, n_i) + f_T(B, ctx, m_i + 1 + k) - f_T(B, ctx,
  m_i + 1)) / f_T(B, ctx, 1)``, ``m_i`` the nodes of the tree so far (layers
  ``1..i``) that reranking would verify: with the root they are ``m_i + 1``
  tokens a row (a chain's ``m_i`` is ``i``; a wide layer's is more, and at
  B=8 its nodes already fill the verify curve's cheap part). Until
  ``7d5bcca`` the whole layer's ``u^(i)`` was priced as one verified node,
  ``k = 1`` in the price and ``k = n_i`` in the gain; with the gate held open
  at MT-bench B=8 on the tuning prompts (2-core Intel Xeon with AMX) the
  rule ran 1.165x vanilla against 1.102x, every pair faster, and at B=1,
  where verifying a few more tokens costs 0.005 plain steps each, MT-bench
  1.35x against 1.36x and HumanEval 2.61x against 2.77x
  (``bench/results/depth_margin_ab``). The verify curve is flat at B=1
  on a CPU and climbs with the batch (2-core AMD EPYC, B=8: 0.26-0.30 plain
  steps a token, more than a drafter forward), so the price deepens trees
  where verifying is cheap and keeps them shallow where it is not. With the
  speedup gate held open on the tuning prompts (2-core AMD EPYC, int8
  drafter, ``bench/results/depth_price_ab``), B=8 ran 1.01x / 0.96x vanilla
  (HumanEval / MT-bench) with it, 0.88x / 0.86x without (HumanEval: 3.2-2.4
  against 8.7-5.8 drafter forwards a step). Priced (``k = 1``) at the chain's ``i + 2``
  tokens instead of ``m_i + 2``, with the gate held open at B=8 on the 2-core
  Intel Xeon with AMX (tuning prompts, interleaved; ``bench/results/depth_margin_ab``),
  MT-bench ran 1.11x against 1.16x vanilla with ``m_i``, and with the gate on,
  B=1 1.53x / 2.78x against 1.64x / 2.87x (MT-bench / HumanEval), B=4 1.04x /
  1.72x against 1.29x / 1.80x.
  With context lookup (``cast_core.lookup``, beyond the paper) the lookup's
  node at depth ``i + 1``, where its path so far is among layer ``i``'s kept
  nodes, is drafted without a forward; its ``v`` (batch mean) is subtracted
  from ``alpha * U_k^(i)``.

  *Reranking*: all nodes sorted by ``v``; ``u_k`` cumulative, ``c_k =
  f_T(B, ctx, k + 1) / f_T(B, ctx, 1)`` (``k`` nodes plus the root),
  ``u_0 = 0, c_0 = 1``; ``m = algorithm1(u, c, C3)``.

With an affine cost model and a matching ``C1``, breadth pruning keeps exactly
the top ``K`` of every layer (the paper's Theorem 4.1): CAST generalises EAGLE-2.

Beyond the paper, ``cast`` carries a speedup gate (``cast_core.gate``): the
drafter's catch-up forward is spent before any of the three questions is
asked, so at batch sizes where no tree pays for it the gate skips drafting
(a plain decode step) and probes now and then. With ``adaptive_thresholds``
the thresholds are ``C_j * max(1, rho^B)``, ``rho^B`` the speedup drafted
steps achieved at batch size ``B``. Where a row's own context predicts what
follows (``cast_core.lookup``), a step may also skip the drafter and verify
the lookups alone, when their measured acceptance per unit of verify cost
beats what drafting (or a plain step) yields (``lookup_only_length``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cast_core.cost import CostProfile
from cast_core.gate import DraftGate
from cast_core.kv import TailStash
from cast_core.lookup import ContextIndex, LookupAcceptance, common_prefix_length

POLICY_NAMES = ("none", "static", "cast")


def algorithm1(utility: np.ndarray, cost: np.ndarray, threshold: float) -> int:
    """Cost-aware choice of a count ``k`` (the paper's Algorithm 1).

    ``utility[k]`` and ``cost[k]`` are cumulative for ``k = 0..n`` (index 0 is
    the starting point). Walk ``k = 1..n`` with an anchor ``a`` (initially 0):
    accept ``k`` if ``cost[k] <= cost[a]`` (free) or
    ``(utility[k] - utility[a]) / (cost[k] - cost[a]) > threshold``; a costly
    acceptance moves the anchor to ``k``. The scan does not stop at the first
    rejection: a later ``k`` past a cost step can still pay for itself, since
    tile effects make measured costs flat between steps. Returns the largest
    accepted ``k`` (0 if none).
    """
    n = len(utility) - 1
    anchor, best = 0, 0
    for k in range(1, n + 1):
        dc = cost[k] - cost[anchor]
        if dc <= 0:
            best = k
        elif utility[k] - utility[anchor] > threshold * dc:
            best, anchor = k, k
    return best


class StaticConfig(BaseModel):
    """EAGLE-2's fixed tree shape (defaults are EAGLE-2's)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(10, ge=1, le=64, description="Children kept per layer (and expanded per layer).")
    depth: int = Field(6, ge=1, le=32, description="Number of drafted layers.")
    total_tokens: int = Field(60, ge=1, le=512, description="Drafted nodes sent to the verifier (root excluded).")


class CastConfig(BaseModel):
    """CAST thresholds and bounds; costs are in units of one target decode step."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(10, ge=1, le=64, description="Candidates per layer: children considered per layer, before breadth pruning.")
    max_depth: int = Field(10, ge=1, le=32, description="Hard cap on drafted layers.")
    max_verify: int = Field(64, ge=1, le=512, description="Hard cap on drafted nodes verified per step.")
    c1: float = Field(1.0, gt=0, description="Breadth threshold C1: keep k nodes of a layer while marginal expected tokens per marginal drafter cost exceeds C1.")
    c2: float = Field(1.25, gt=0, description="Depth threshold C2: grow the next layer iff, for some k, alpha * U_k^(i) >= C2 * c_k^(i), U_k^(i) the sum of layer i's k largest kept path confidences and c_k^(i) the drafter forward that expands layer i plus verifying k more nodes beyond those of the tree so far that reranking would verify, in plain steps (times max(1, rho^B) with adaptive thresholds; alpha * U_k^(i) <= 1, so no layer beyond the first grows once C2 * rho^B * c_1^(i) > 1).")
    c3: float = Field(1.5, gt=0, description="Reranking threshold C3: verify k nodes while marginal expected tokens per marginal verifier cost exceeds C3.")
    r: int = Field(4, ge=1, le=64, description="R: number of recent depth gain ratios averaged into alpha.")
    min_speedup: float = Field(1.0, gt=0, description="Speedup gate: draft at batch size B only while drafted steps there achieve at least this speedup over plain decoding (tokens per step x plain step seconds / measured step seconds); see cast_core.gate.")
    max_skip: int = Field(256, ge=1, le=4096, description="Speedup gate: most plain steps between two probing drafted steps while the gate is closed.")
    probe_budget: float = Field(0.01, gt=0, le=1, description="Speedup gate: share of time a gate below break-even may lose: closed, to failing probes (sets the plain steps between probes from a probe's cost); open but thinned, to its drafted steps (once their loss, C_full - n / min_speedup plain steps each, C_full the step's whole wall time with the catch-up of the plain steps before it, exceeds this share of the last ~256 plain steps' worth of time, steps stay plain; see cast_core.gate). At 0.03, MT-bench B=8 batches with 0-1 % of steps drafted (probes) ran 0.974-0.986x vanilla on the 2-core AMD EPYC, most of the margin under the 0.97x floor.")
    probe_context: int = Field(16, ge=1, le=4096, description="Speedup gate: where feeding a long catch-up (a new row's prompt, a backlog) whole would not repay its profiled cost over the rows' remaining tokens, and at every probe of a closed gate, a drafted step's drafter catches up on at most this many of a row's most recent tokens (plus the first 4 when its cache is empty); the rest stays out of the drafter's cache, so a probe costs the same however long the gate was closed.")
    min_judged: int = Field(16, ge=1, le=256, description="Speedup gate: drafted row steps judged at a batch size B before the gate may close there, i.e. ceil(min_judged / B) drafted steps, 16 at B=1 and 2 at B=8. One row's speedup is noisy (a tree that accepts nothing scores about 0.5 where the average is 1.5); a batch's first steps score the mean over its B rows (later ones, the rows with the most tokens left).")
    close_confidence: float = Field(2.0, ge=0, le=10, description="Speedup gate: z, the confidence Phi(z) with which rho^B must fall below min_speedup before the gate closes (T + t S < min_speedup K, S the spread of the drafted steps' tokens about rho^B C, t Student's t quantile at Phi(z) on n_eff - 1 degrees of freedom, as S is estimated from the same n_eff steps' worth: 14 standard errors on two steps at z = 2, 2.1 on 32; see cast_core.gate). A closed gate skips up to max_skip steps, so one closing on a few unlucky trees costs far more than one more drafted step: at HumanEval B=2 on the 2-core AMD EPYC, with the draft vocabulary's deeper trees, per-step tokens ran 1 to 11 and the gate closed after 6 steps at 0.69x where open runs of the same groups gave 1.04-1.36x vanilla. 0: close on the point estimate.")
    gate_window: float = Field(32.0, gt=0, le=4096, description="Speedup gate: plain steps' worth of drafted time the achieved speedup is measured over (older steps decay as exp(-age / window)).")
    lookup_tokens: int = Field(12, ge=0, le=32, description="Context lookup: most tokens of a row's own earlier continuation of its current suffix (cast_core.lookup) fed after the root in the drafter's catch-up forward, priced by the drafter there and grafted onto the tree (v = the drafter's path confidence), so a repeated span is drafted deep for one forward's few extra tokens; fed only where its recent utility beats its price in the catch-up forward (CastPolicy.use_lookup). 0: off. On the 2-core AMD EPYC at B=1, 5 prompts each, interleaved: MT-bench 1.40x vanilla off, 1.55x at 12; HumanEval 1.63x off, 1.60x at 8, 1.68x at 12.")
    lookup_only: bool = Field(False, description="Context lookup: let a step skip the drafter and verify each row's lookup alone where the lookups' measured acceptance per unit of verify cost beats what drafting (or, with the gate closed, a plain step) yields (CastPolicy.lookup_only_length); the drafter catches up on the skipped tokens at its next drafted step. Off by default: not yet measured on the AVX-512 bf16 machine the benchmark runs on.")
    lookup_ngram: int = Field(3, ge=1, le=8, description="Context lookup: longest suffix (tokens) matched against the row's earlier tokens; shorter suffixes are tried down to 1.")
    lookup_probe_budget: float = Field(0.01, gt=0, le=1, description="Context lookup: share of time a lookup whose measured gain no longer pays its price may lose to probes (a fed lookup costs at most its extra catch-up width, ΔC_D plain steps, so one is fed again after ΔC_D / lookup_probe_budget drafted steps that found one and did not feed it).")
    adaptive_thresholds: bool = Field(True, description="Scale C1, C2, C3 by max(1, achieved speedup at B): a node must beat the speedup already achieved, not merely plain decoding.")
    size_for_slowest: bool = Field(True, description="Size each step's trees (breadth, depth, verified nodes) from the confidences of the rows with the most tokens left, the ones a batch waits for, rather than the mean row: a token a row gains ahead of the batch's slowest row shortens no batch where a step costs about the same whatever its rows (CPU). Where finished rows are replaced at once (continuous batching) this errs towards smaller trees.")


@dataclass
class CostContext:
    """Cost curves for one planning decision, normalised by one plain target step.

    Attributes:
        drafter: ``drafter[k] = f_D(B, ctx, k) / f_T(B, ctx, 1)``, ``drafter[0] = 0``.
        target: ``target[k] = f_T(B, ctx, k) / f_T(B, ctx, 1)``, ``target[0] = 0``.
        batch_size: ``B`` the curves were read at.
        context: context length the curves were read at.
        step_s: ``f_T(B, ctx, 1)`` in seconds (0: unknown; the speedup gate
            then judges steps by their predicted cost instead of their wall time).
        drafter_alone: ``drafter_alone[k] = f_D(1, ctx, k) / f_T(B, ctx, 1)``: a drafter forward of one
            row alone, as a prompt is fed apart from the batch (``cast_core.drafter``); None: unknown.
    """

    drafter: np.ndarray
    target: np.ndarray
    batch_size: int
    context: int
    step_s: float = 0.0
    drafter_alone: np.ndarray | None = None

    @staticmethod
    def from_profile(profile: CostProfile, batch_size: int, context: int, max_tokens: int) -> "CostContext":
        """Read both curves from ``profile`` at ``(batch_size, context)`` for ``0..max_tokens`` tokens.

        ``step_s`` is left unknown (0) for a synthetic profile: its seconds are no measurement of this machine.
        """
        target = np.asarray(profile.latency_curve("target", batch_size, context, max_tokens), dtype=np.float64)
        drafter = np.asarray(profile.latency_curve("drafter", batch_size, context, max_tokens), dtype=np.float64)
        alone = np.asarray(profile.latency_curve("drafter", 1, context, max_tokens), dtype=np.float64)
        step = target[1]
        return CostContext(
            drafter=drafter / step,
            target=target / step,
            batch_size=batch_size,
            context=context,
            step_s=profile.plain_step_seconds(step),
            drafter_alone=alone / step,
        )

    def drafter_cost(self, tokens: int) -> float:
        """``C_D(B, n) = f_D(B, ctx, n) / f_T(B, ctx, 1)`` for any ``n >= 0``: the curve, extended past its end
        with its last segment's slope (as the profile extrapolates past its largest measured token count)."""
        return _extended(self.drafter, tokens)

    def drafter_alone_cost(self, tokens: int) -> float:
        """``f_D(1, ctx, n) / f_T(B, ctx, 1)``: one row's drafter forward of ``n`` tokens alone, extended as
        ``drafter_cost``; ValueError where ``drafter_alone`` is unknown."""
        if self.drafter_alone is None:
            raise ValueError("drafter_alone: no curve for a row fed alone")
        return _extended(self.drafter_alone, tokens)

    def target_cost(self, tokens: int) -> float:
        """``C_T(B, n) = f_T(B, ctx, n) / f_T(B, ctx, 1)`` for any ``n >= 0``, extended as ``drafter_cost``."""
        return _extended(self.target, tokens)


def _extended(curve: np.ndarray, tokens: int) -> float:
    """``curve[tokens]``, past its end its last value plus its last segment's slope per token."""
    last = len(curve) - 1
    if tokens <= last:
        return float(curve[max(tokens, 0)])
    slope = curve[last] - curve[last - 1] if last > 0 else 0.0
    return float(curve[last] + slope * (tokens - last))


@dataclass
class DepthHistory:
    """Per-sequence FIFO of the last ``R`` depth gain ratios ``phi`` (starts as ``{1}``)."""

    r: int
    ratios: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not self.ratios:
            self.ratios = deque([1.0], maxlen=self.r)
        else:
            self.ratios = deque(self.ratios, maxlen=self.r)

    def alpha(self) -> float:
        return float(np.mean(self.ratios))

    def push(self, phi: float) -> None:
        self.ratios.append(phi)


def reference_step_s(plain_step_s: float) -> float:
    """``t_ref``: the profile's plain step ``plain_step_s``, or 1 s where there is no measured profile (0).

    The gate keeps a timed plain step as ``t / t_ref`` and judges a drafted step against ``m^B * t_ref``;
    both sides read ``t_ref`` here, so the two agree.
    """
    return plain_step_s or 1.0


@dataclass
class PlainStep:
    """A step the speedup gate skipped the drafter for (its wall time is a plain step's).

    Attributes:
        batch_size: ``B`` it ran at.
        started: ``time.perf_counter()`` at its drafting call.
        plain_step_s: ``t_ref``, the profile's plain step at its batch size and context (0: no measured profile).
        timed: whether its wall time is reported to the gate. The first plain step after a
            drafted one is not: it ran 0.31-0.49 s against 0.26-0.36 s for later plain steps
            (MT-bench, B = 4..8, 2-core Intel Xeon), and with 3-5 timings a median landing on it reads
            ``rho^B`` about 5 % high right at break-even.
    """

    batch_size: int
    started: float
    plain_step_s: float
    timed: bool = True


@dataclass
class DraftedStep:
    """A drafted step, as the speedup gate judges it once its tokens are known.

    Attributes:
        batch_size: ``B`` it was planned at.
        started: ``time.perf_counter()`` when its drafting began.
        plain_step_s: seconds of one plain target step at ``B`` from a measured profile (0: unknown).
        predicted_cost: its cost in plain target steps, from the cost context
            (catch-up of its fresh chains + drafted layers + verify forward).
        lookup: the context-lookup tokens fed for its row and the depth the
            drafted tree reached along their path (None: the step fed no lookup).
        backlog_s: seconds of its catch-up forward spent on the tokens of the plain steps before it
            (thinned, skipped), beyond what its fresh chains took (``cast_core.drafter``).
        backlog_cost: the same in plain target steps, from the cost context.
        prompt_s: seconds of its catch-up forward spent on new rows' prompts beyond its fresh chains:
            a one-off debt, not the cost of drafting, left out of its wall time.
    """

    batch_size: int
    started: float
    plain_step_s: float
    predicted_cost: float
    lookup: tuple[list[int], int] | None = None
    backlog_s: float = 0.0
    backlog_cost: float = 0.0
    prompt_s: float = 0.0

    def judge(self, wall: float, scale: float | None) -> tuple[float, float, bool]:
        """``(C, C_full, on_profile)`` of the step, which took ``wall`` seconds (to the next drafting call),
        ``prompt_s`` of them on prompts.

        ``C_full = wall / plain`` and ``C = (wall - backlog_s) / plain`` (what the step costs where every
        step drafts, leaving no backlog): ``plain = m^B * t_ref`` with ``scale`` = ``m^B``, timed plain
        steps' median machine scale (``DraftGate.plain_scale``), and ``t_ref`` = ``plain_step_s`` (1 s
        without a profile); else the profile's ``plain_step_s`` (``on_profile``); with neither,
        ``C = predicted_cost`` and ``C_full = predicted_cost + backlog_cost``.
        """
        wall -= self.prompt_s
        plain = scale * reference_step_s(self.plain_step_s) if scale is not None else self.plain_step_s
        if plain > 0 and wall > self.backlog_s:
            return (wall - self.backlog_s) / plain, wall / plain, scale is None
        return self.predicted_cost, self.predicted_cost + self.backlog_cost, False


@dataclass
class LookupStep:
    """A drafter-free step: the row's context lookup alone was verified (``CastPolicy.lookup_only_length``).

    Attributes:
        batch_size: ``B`` it ran at.
        ngram: length of the suffix the lookup matched.
        guess: the lookup tokens verified.
    """

    batch_size: int
    ngram: int
    guess: list[int]

    def accepted(self, committed: list[int]) -> int:
        """How many of ``guess`` the step accepted, given the tokens it ``committed`` (accepted drafts + bonus)."""
        return common_prefix_length(self.guess, committed)


@dataclass
class RowPlan:
    """Planning memory of one sequence, carried across its steps.

    Attributes:
        depth: the depth gain FIFO (``alpha``).
        backlog: tokens committed while the speedup gate skipped the drafter;
            fed, ahead of the new pending tokens, at the next drafted step.
        last_step: the sequence's last step (drafted, skipped or lookup-only), until the gate has judged it.
        stash: the drafter's cache entries of the nodes it fed for the last
            tree, reused for the drafts the verifier accepts from it.
        tokens_left: new tokens the sequence may still commit (its budget less
            the tokens of its judged steps; None: unbounded); the speedup gate
            weighs feeding a long catch-up whole against it.
        rare_tokens: ids of its context outside the drafter's core vocabulary
            (``cast_core.vocab``), which the drafter scores besides the core.
        context: its tokens so far, indexed for context lookup (``cast_core.lookup``).
    """

    depth: DepthHistory
    backlog: list[int] = field(default_factory=list)
    last_step: DraftedStep | PlainStep | LookupStep | None = None
    stash: TailStash | None = None
    tokens_left: int | None = None
    rare_tokens: set[int] = field(default_factory=set)
    context: ContextIndex = field(default_factory=ContextIndex)

    @property
    def budget_left(self) -> float:
        """``tokens_left``, with an unbounded sequence counted as ``math.inf``."""
        return math.inf if self.tokens_left is None else self.tokens_left


class TreePolicy(ABC):
    """Answers the drafter's three questions for a batch (see module docstring)."""

    name: str
    #: candidates per layer (children kept per layer before breadth pruning)
    top_k: int
    #: hard cap on drafted layers
    max_depth: int
    #: most context-lookup tokens fed ahead of the root per row (0: no lookup)
    lookup_tokens: int = 0

    @property
    def drafts(self) -> bool:
        """False for plain decoding (no drafter forward at all)."""
        return True

    def use_lookup(self, chain_width: int, fed_width: int, ctx: CostContext | None) -> bool:
        """Whether to feed the rows' lookup tokens, widening the catch-up forward from ``chain_width`` to ``fed_width`` tokens."""
        return self.lookup_tokens > 0

    def observe_lookup(self, gain: float) -> None:
        """Record what a fed lookup added: accepted tokens per row that only its grafted nodes offered (``lookup_gain``)."""

    def lookup_only_length(self, guesses: list[tuple[list[int], int]], ctx: CostContext | None, baseline: float) -> int:
        """Tokens of each row's lookup to verify in a drafter-free step (0: no such step); ``guesses``: each
        active row's lookup and matched suffix length; ``baseline``: tokens per plain step the alternative yields."""
        return 0

    def observe_lookup_step(self, step: LookupStep, committed: list[int]) -> None:
        """Record how a drafter-free step went: it committed ``committed`` (accepted drafts + bonus)."""

    @property
    def needs_costs(self) -> bool:
        """Whether decisions read a ``CostContext``."""
        return False

    @property
    def sizes_for_slowest(self) -> bool:
        """Whether tree decisions read only the rows with the most tokens left (else every active row)."""
        return False

    @property
    def cost_horizon(self) -> int:
        """Largest token count a decision reads from the cost curves."""
        return 1

    @property
    def gate(self) -> DraftGate | None:
        """The speedup gate deciding whether to draft at all (None: always draft)."""
        return None

    def new_row_plan(self, tokens_left: int | None = None) -> RowPlan:
        """Fresh planning memory for a new sequence that may commit ``tokens_left`` new tokens (None: unbounded)."""
        return RowPlan(DepthHistory(4), tokens_left=tokens_left)

    @abstractmethod
    def layer_width(self, layer: int, confidences: np.ndarray, ctx: CostContext | None) -> int:
        """How many of layer ``layer``'s candidates to keep; ``confidences`` is ``[B, M]`` sorted descending."""

    @abstractmethod
    def grow(
        self,
        layer: int,
        kept: np.ndarray,
        ctx: CostContext | None,
        histories: list[DepthHistory],
        covered: float = 0.0,
        verified: int | None = None,
    ) -> bool:
        """Whether to expand layer ``layer``'s kept nodes (``kept`` = their ``v``, ``[B, n_i]``); ``covered``: the
        part of the next layer's utility (batch mean) that context lookup drafts without a forward; ``verified``:
        how many of the tree's nodes so far ``verify_count`` would send to the verifier (None: ``layer``, a chain's)."""

    def observe_layer(self, prev_kept: np.ndarray, kept: np.ndarray, histories: list[DepthHistory]) -> None:
        """Record ``phi = u^(i+1) / u^(i)`` per row after a layer was built."""

    @abstractmethod
    def verify_count(self, confidences: np.ndarray, ctx: CostContext | None) -> int:
        """How many drafted nodes to verify; ``confidences`` is ``[B, N]`` sorted descending."""


class NoDraftPolicy(TreePolicy):
    """Plain autoregressive decoding: every tree is its root alone."""

    name = "none"
    top_k = 1
    max_depth = 0

    @property
    def drafts(self) -> bool:
        return False

    def layer_width(self, layer: int, confidences: np.ndarray, ctx: CostContext | None) -> int:
        return 0

    def grow(self, layer, kept, ctx, histories, covered=0.0, verified=None) -> bool:
        return False

    def verify_count(self, confidences: np.ndarray, ctx: CostContext | None) -> int:
        return 0


class StaticTreePolicy(TreePolicy):
    """EAGLE-2: fixed top-k per layer, fixed depth, rerank to a fixed total."""

    name = "static"

    def __init__(self, config: StaticConfig | None = None) -> None:
        self.config = config or StaticConfig()
        self.top_k = self.config.top_k
        self.max_depth = self.config.depth

    def layer_width(self, layer: int, confidences: np.ndarray, ctx: CostContext | None) -> int:
        return min(self.config.top_k, confidences.shape[1])

    def grow(self, layer, kept, ctx, histories, covered=0.0, verified=None) -> bool:
        return layer < self.config.depth

    def verify_count(self, confidences: np.ndarray, ctx: CostContext | None) -> int:
        return min(self.config.total_tokens, confidences.shape[1])


class CastPolicy(TreePolicy):
    """CAST: breadth pruning, depth pruning and dynamic reranking from measured costs."""

    name = "cast"
    #: weight of the newest step in the lookup's recent utility ``g``
    LOOKUP_DECAY = 0.25

    def __init__(self, config: CastConfig | None = None) -> None:
        self.config = config or CastConfig()
        self.top_k = self.config.top_k
        self.max_depth = self.config.max_depth
        self.lookup_tokens = self.config.lookup_tokens
        self._lookup_gain = 1.0
        self._lookup_idle = 0  # drafted steps since a lookup was last fed, each having found one
        self._lookup_runs = LookupAcceptance(self.config.lookup_ngram, max(1, self.lookup_tokens))
        c = self.config
        self._gate = DraftGate(
            min_speedup=c.min_speedup,
            max_skip=c.max_skip,
            window=c.gate_window,
            probe_budget=c.probe_budget,
            probe_context=c.probe_context,
            min_judged=c.min_judged,
            close_confidence=c.close_confidence,
        )

    @property
    def needs_costs(self) -> bool:
        return True

    @property
    def sizes_for_slowest(self) -> bool:
        return self.config.size_for_slowest

    @property
    def gate(self) -> DraftGate:
        return self._gate

    def new_row_plan(self, tokens_left: int | None = None) -> RowPlan:
        return RowPlan(DepthHistory(self.config.r), tokens_left=tokens_left, context=ContextIndex(self.config.lookup_ngram))

    def use_lookup(self, chain_width: int, fed_width: int, ctx: CostContext | None) -> bool:
        """Feed the lookup iff its expected utility beats its price, ``g > C1' * ΔC_D`` with
        ``ΔC_D = C_D(B, w_fed) - C_D(B, w)``, or as a probe.

        ``g`` is the lookup's recent utility (``observe_lookup``, an average with weight
        ``LOOKUP_DECAY`` on the newest step): the tokens per row its grafted nodes got
        accepted beyond the drafted tree (``cast_core.lookup.lookup_gain``), measured rather
        than the drafter's confidence in them, which counts grafted nodes the verify
        budget left out. ``C1'`` is the breadth threshold as scaled. A lookup that does not
        pay is probed (fed once, so ``g`` is measured again) after ``n`` drafted steps that
        found one, ``n * lookup_probe_budget >= ΔC_D``: a probe loses at most ``ΔC_D`` plain
        steps and the ``n`` steps before it took at least one plain step each, so failing
        probes cost at most ``lookup_probe_budget`` of the time.
        """
        assert ctx is not None, "the cast policy needs a cost context"
        if self.lookup_tokens == 0:
            return False
        extra = ctx.drafter_cost(fed_width) - ctx.drafter_cost(chain_width)
        if extra > 0 and self._lookup_gain <= self._threshold(self.config.c1, ctx) * extra:
            self._lookup_idle += 1
            if self._lookup_idle * self.config.lookup_probe_budget < extra:
                return False
        self._lookup_idle = 0
        return True

    @property
    def lookup_gain(self) -> float:
        """``g``: the context lookup's recent utility per row (1 before any lookup was grafted)."""
        return self._lookup_gain

    def observe_lookup(self, gain: float) -> None:
        self._lookup_gain += self.LOOKUP_DECAY * (gain - self._lookup_gain)

    def lookup_only_length(self, guesses: list[tuple[list[int], int]], ctx: CostContext | None, baseline: float) -> int:
        """``L`` maximising the tokens a drafter-free step gains per plain step of cost, if that beats ``baseline``::

            rate(L) = mean_r (1 + E_{n_r}(min(L, |a_r|))) / C_T(B, 1 + L)

        ``E_n`` is the measured acceptance of lookups by matched suffix length (``LookupAcceptance``),
        ``C_T`` the verify cost in plain steps, ``baseline`` what the step would gain otherwise per plain
        step (``max(1, rho^B)``: drafting's recent speedup, 1 where the gate keeps steps plain). 0 (draft
        or step plainly) where no ``L`` beats it. Skipping the drafter saves its forwards; it catches up on
        the step's tokens at its next drafted step, in the catch-up forward it runs anyway.
        """
        assert ctx is not None, "the cast policy needs a cost context"
        if not self.config.lookup_only:
            return 0
        longest = min(max((len(g) for g, _ in guesses), default=0), len(ctx.target) - 2)
        curves = {n: self._lookup_runs.expected_curve(n, longest) for n in {n for _, n in guesses}}
        best, best_rate = 0, baseline
        for length in range(1, longest + 1):
            gain = float(np.mean([1.0 + curves[n][min(length, len(g))] for g, n in guesses]))
            rate = gain / float(ctx.target[1 + length])
            if rate > best_rate:
                best, best_rate = length, rate
        return best

    def observe_lookup_step(self, step: LookupStep, committed: list[int]) -> None:
        self._lookup_runs.observe(step.ngram, len(step.guess), step.accepted(committed))

    def _threshold(self, base: float, ctx: CostContext) -> float:
        """``base``, times ``max(1, rho^B)`` with adaptive thresholds."""
        return base * self._gate.threshold_scale(ctx.batch_size) if self.config.adaptive_thresholds else base

    @property
    def cost_horizon(self) -> int:
        return max(self.config.top_k, self.config.max_verify + 1)

    @staticmethod
    def _utility(confidences: np.ndarray) -> np.ndarray:
        """Batch-mean cumulative utility ``u_k`` for ``k = 0..M``."""
        cum = np.cumsum(confidences, axis=1).mean(axis=0)
        return np.concatenate([[0.0], cum])

    def layer_width(self, layer: int, confidences: np.ndarray, ctx: CostContext | None) -> int:
        assert ctx is not None, "the cast policy needs a cost context"
        m = confidences.shape[1]
        cost = ctx.drafter[: m + 1]
        return max(1, algorithm1(self._utility(confidences), cost, self._threshold(self.config.c1, ctx)))

    def grow(self, layer, kept, ctx, histories, covered=0.0, verified=None) -> bool:
        """Grow iff ``alpha * U_k - covered >= C2 * c_k`` for some ``k`` (``C2`` scaled as ``_threshold``), ``U_k``
        the mean row's sum of its ``k`` largest kept ``v`` and ``c_k = C_D(n_i) + C_T(m_i + 1 + k) - C_T(m_i + 1)``
        (module docstring)."""
        assert ctx is not None, "the cast policy needs a cost context"
        if layer >= self.config.max_depth:
            return False
        alpha = float(np.mean([h.alpha() for h in histories])) if histories else 1.0
        top = np.cumsum(-np.sort(-kept, axis=1), axis=1).mean(axis=0)  # U_k for k = 1..n_i
        m = layer if verified is None else verified
        forward, base = ctx.drafter_cost(kept.shape[1]), ctx.target_cost(m + 1)
        cost = np.array([forward + ctx.target_cost(m + 1 + k) - base for k in range(1, len(top) + 1)])
        return bool(np.any(alpha * top - covered >= self._threshold(self.config.c2, ctx) * cost))

    def observe_layer(self, prev_kept: np.ndarray, kept: np.ndarray, histories: list[DepthHistory]) -> None:
        prev = prev_kept.sum(axis=1)
        new = kept.sum(axis=1)
        for h, p, u in zip(histories, prev, new):
            if p > 0:
                h.push(float(u / p))

    def verify_count(self, confidences: np.ndarray, ctx: CostContext | None) -> int:
        assert ctx is not None, "the cast policy needs a cost context"
        m = min(confidences.shape[1], self.config.max_verify, len(ctx.target) - 2)
        utility = self._utility(confidences[:, :m])
        cost = ctx.target[1 : m + 2]  # k nodes + root: c_k = f_T(k + 1) / f_T(1); c_0 = 1
        return algorithm1(utility, cost, self._threshold(self.config.c3, ctx))


def make_policy(name: str, static: StaticConfig | None = None, cast: CastConfig | None = None) -> TreePolicy:
    """Policy by name; ``ValueError`` naming ``policy`` for an unknown name."""
    if name == "none":
        return NoDraftPolicy()
    if name == "static":
        return StaticTreePolicy(static)
    if name == "cast":
        return CastPolicy(cast)
    raise ValueError(f"policy must be one of {', '.join(POLICY_NAMES)}; got {name!r}")
