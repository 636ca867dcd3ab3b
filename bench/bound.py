"""How fast speculation can be on this hardware: speedup bounds from measured costs and acceptance.

Per batch size ``B``, from the cost profile at context ``ctx`` (in plain target steps)::

    c_D    = f_D(B, ctx, 1) / f_T(B, ctx, 1)     one drafter forward
    c_V(n) = f_T(B, ctx, n) / f_T(B, ctx, 1)     verifying n tokens per row

``c_D`` may instead come from a benchmark run (``drafter_cost``): its
drafting seconds per drafter forward over vanilla's step seconds at the same
batch size -- what the engine paid, catch-up and planning included, rather
than what the profiler timed in isolation.

A step that drafts ``d`` layers runs at least ``d`` drafter forwards (the
catch-up, which yields layer 1, and one per further layer) and verifies at
least ``d + 1`` tokens per row; it gains at most ``1 + d`` tokens. Hence::

    S_perfect(B) = max_d (1 + d) / (d * c_D + c_V(d + 1))                 every draft accepted
    S_chain(B)   = max_d (1 + sum_{i<d} q_i) / (d * c_D + c_V(d + 1))     measured acceptance

``q_i`` is the share of drafted steps that accepted more than ``i`` drafts,
measured on CAST's own trees (a tree accepts at least as often as its best
chain); beyond the deepest measured depth, each further depth keeps the last
measured conditional rate ``q_i / q_{i-1}``. Neither bound counts prefill or
framework time, so measured end-to-end speedups sit below both.

No bound here counts the time a run spends outside its decode steps (the
target's prefill above all), which speculation does not shorten. Where
plain decoding spends a share ``p`` of its wall time there, a step speedup
``S`` makes the whole run at most (Amdahl's law)::

    S_run = 1 / (p + (1 - p) / S)                 ``whole_run_ceiling``

and less again by what speculation adds outside the steps' budget (the
drafter's own prompt feed).

``S_chain`` charges chain costs for tree acceptance, so it is an estimate. A
strict ceiling for trees of this drafter comes from where the target's greedy
tokens rank among the drafter's guesses (``bench.ranks``): a best-first tree
accepting ``d`` drafts from output position ``i`` holds at least ``R_d(i) =
r_i + ... + r_{i+d-1}`` drafted nodes (every rank at most ``top_k``, ``d`` at
most ``max_depth``). With hindsight, a step at ``i`` drafts exactly that
path's tree and gains ``1 + d`` tokens for at least ``d * c_D + c_V(R_d(i) +
1)``; ``d = 0`` is a plain step (cost 1). The least time to produce the whole
output ``y`` is the dynamic program::

    T(i) = min_d [ cost(d, i) + T(i + d + 1) ],   T(i) = 0 for i >= |y|
    S_oracle(B) = sum |y| / sum T(0)

over the outputs measured at ``B``, each row priced at batch size ``B``'s
costs as if it chose its tree alone (a batch pays for its largest tree, so
this only flatters). A static batch also runs until its slowest row is
done, so per batch of the run ``S_static(B) = sum max_b |y_b| / sum max_b
T_b(0)`` (``static_batch_oracle_bound``): a batch step costs at least the
tree holding any one row's accepted path. ``c_D`` is the profile's
single-token drafter forward, the least a drafter forward costs, unless a
measured one is given. No
best-first tree policy of this drafter, however well it guesses, beats
``S_oracle`` with forwards that cost ``c_D``.

Between the two sits what knowing *how often* the drafter is right buys,
without knowing *when*: a greedy chain of one fixed depth ``d`` every step,
replayed exactly on the same ranks (a step from ``i`` accepts the leading
``r = 1`` drafts of ``r_i .. r_{i+d-1}``, then the bonus token)::

    S_fixed(B) = max_d  sum |y| / sum_steps (d * c_D + c_V(d + 1))

with ``d`` chosen once for the whole run, in hindsight. A policy must read
the drafter's confidences to beat it.

What reading them buys, for chains: from position ``i`` a chain drafts while
its path confidence ``v_d = p_i * ... * p_{i+d-1}`` (``p`` the drafter's
teacher-forced top-1 probabilities, ``bench.ranks``) stays at least
``theta``, and stops at the first ``d`` with ``v_d < theta`` or ``d = D``:
the forward that reveals ``p_{i+d-1}`` has already drafted that token, so
it is verified too. The step costs ``d * c_D + c_V(d + 1)`` and gains the
leading ``r = 1`` drafts plus the bonus token::

    S_conf(B) = max_{theta, D}  sum |y| / sum_steps (d * c_D + c_V(d + 1))

over a grid of ``theta`` and every cap ``D <= max_depth``, chosen in
hindsight (``theta = 0`` is the fixed chain of depth ``D``, so ``S_conf >=
S_fixed``; each step's cost is at least the hindsight tree's for the same
accepted drafts, so ``S_conf <= S_oracle``). Past a chain's first rejected
draft, ``p`` is read on the true prefix where the drafter's own path has
diverged; that only moves how long a failed chain runs on.

Both chains have batch forms (``batch_fixed_chain_bound``,
``batch_confidence_chain_bound``) priced like ``S_static``: a batch takes at
least its slowest row's own chain time, where vanilla takes its longest
output's length; strict where every row stays in its batch to the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cast_core.cost import CostProfile

MAX_DEPTH = 48
#: path-confidence thresholds ``theta`` that ``confidence_chain_bound`` tries
CONFIDENCE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20))


@dataclass
class Bound:
    """Speedup bounds at one batch size (see module docstring)."""

    batch_size: int
    drafter_cost: float
    perfect: float
    perfect_depth: int
    chain: float | None
    chain_depth: int | None


def extend_acceptance(q: list[float], depth: int) -> np.ndarray:
    """``q_0 .. q_{depth-1}``: measured shares, then the last conditional rate carried on."""
    out = np.zeros(depth)
    if not q:
        return out
    measured = np.asarray(q[:depth], dtype=np.float64)
    out[: len(measured)] = measured
    if len(q) < depth:
        rate = q[-1] / q[-2] if len(q) >= 2 and q[-2] > 0 else q[-1]
        for i in range(len(q), depth):
            out[i] = out[i - 1] * rate
    return out


def whole_run_ceiling(step_speedup: float, outside_share: float) -> float:
    """``S_run = 1 / (p + (1 - p) / S)``: the whole run's speedup where its decode steps run ``S`` times faster and
    a share ``p`` = ``outside_share`` of plain decoding's wall time lies outside them (module docstring)."""
    if not 0.0 <= outside_share <= 1.0:
        raise ValueError(f"outside_share must be within [0, 1]; got {outside_share}")
    if step_speedup <= 0:
        raise ValueError(f"step_speedup must be > 0; got {step_speedup}")
    return 1.0 / (outside_share + (1.0 - outside_share) / step_speedup)


def profiled_drafter_cost(profile: CostProfile, batch_size: int, context: int) -> float:
    """``c_D`` from the profile: one drafter forward over one plain target step."""
    drafter = profile.latency_curve("drafter", batch_size, context, 1)
    target = profile.latency_curve("target", batch_size, context, 1)
    return float(drafter[1] / target[1])


def _prices(profile: CostProfile, batch_size: int, context: int, horizon: int, drafter_cost: float | None) -> tuple[float, np.ndarray]:
    """``(c_D, c_V)``: ``drafter_cost`` or the profile's ``c_D``, and ``c_V[n]`` for ``n = 0..horizon``."""
    c_d = profiled_drafter_cost(profile, batch_size, context) if drafter_cost is None else drafter_cost
    target = np.asarray(profile.latency_curve("target", batch_size, context, horizon), dtype=np.float64)
    return c_d, target / target[1]


def _has_outputs(groups: list[list[list[int]]]) -> bool:
    """Whether any batch of ``groups`` holds a non-empty output."""
    return any(seq for group in groups for seq in group)


def _batch_speedup(groups: list[list[list[int]]], times: list[list[float]]) -> float:
    """``sum_groups max_b |y_b| / sum_groups max_b T_b``: vanilla's batch lengths over the batches' least times,
    ``times[g][b]`` being row ``b`` of batch ``g``'s own time in plain steps (a batch runs until its slowest row is done)."""
    vanilla = sum(max(map(len, group)) for group in groups if group)
    return vanilla / sum(max(group_times) for group_times in times if group_times)


def speedup_bound(
    profile: CostProfile, batch_size: int, context: int, acceptance: list[float] | None = None, drafter_cost: float | None = None
) -> Bound:
    """``S_perfect`` and (given ``acceptance`` = q) ``S_chain`` at ``batch_size`` (``drafter_cost``: a measured ``c_D``)."""
    c_d, verify = _prices(profile, batch_size, context, MAX_DEPTH + 1, drafter_cost)
    depths = np.arange(1, MAX_DEPTH + 1)
    cost = depths * c_d + verify[depths + 1]
    perfect = (1 + depths) / cost
    chain, chain_depth = None, None
    if acceptance:
        gained = 1 + np.cumsum(extend_acceptance(acceptance, MAX_DEPTH))
        ratio = gained / cost
        chain, chain_depth = float(ratio.max()), int(depths[ratio.argmax()])
    return Bound(batch_size, float(c_d), float(perfect.max()), int(depths[perfect.argmax()]), chain, chain_depth)


def oracle_tree_bound(
    ranks: list[list[int]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    top_k: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> float | None:
    """``S_oracle(B)`` from the drafter ranks of the target's outputs (see module docstring); None without outputs.

    ``drafter_cost``: a measured ``c_D`` to price drafter forwards with instead of the profile's. Each row
    priced alone is ``static_batch_oracle_bound`` over batches of one.
    """
    return static_batch_oracle_bound([[seq] for seq in ranks], profile, batch_size, context, top_k, max_depth, drafter_cost)


def static_batch_oracle_bound(
    groups: list[list[list[int]]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    top_k: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> float | None:
    """``S_static(B)``: ``S_oracle`` for static batches, where a batch runs until its slowest row is done.

    ``groups``: the drafter ranks of each batch's outputs, as the batches ran. A batch step costs at
    least what the tree holding any one row's accepted path costs, so a batch takes at least
    ``max_b T_b(0)`` plain steps, where vanilla takes ``max_b |y_b|``::

        S_static(B) = sum_groups max_b |y_b| / sum_groups max_b T_b(0)

    A strict ceiling where every row of a batch stays in it to the end (a batch that sheds finished
    rows steps more cheaply than its size's prices, which this then overcharges). ``drafter_cost``:
    a measured ``c_D`` to price drafter forwards with instead of the profile's. None without outputs.
    """
    if not _has_outputs(groups):
        return None
    c_d, verify = _prices(profile, batch_size, context, max_depth * top_k + 1, drafter_cost)
    return _batch_speedup(groups, [[_oracle_time(seq, c_d, verify, top_k, max_depth) for seq in group] for group in groups])


def _oracle_time(seq: list[int], c_d: float, verify: np.ndarray, top_k: int, max_depth: int) -> float:
    """``T(0)`` for one output's ranks ``seq``: ``T(i) = min_d [cost(d, i) + T(i + d + 1)]``, ``T(|y|) = 0``."""
    n = len(seq)
    best = np.zeros(n + 1)  # best[i] = T(i)
    for i in range(n - 1, -1, -1):
        cost, nodes = 1.0 + best[i + 1], 0  # d = 0: a plain step
        for d in range(1, min(max_depth, n - i) + 1):
            if seq[i + d - 1] > top_k:
                break
            nodes += seq[i + d - 1]
            cost = min(cost, d * c_d + verify[nodes + 1] + best[min(i + d + 1, n)])
        best[i] = cost
    return float(best[0])


def fixed_chain_bound(
    ranks: list[list[int]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> tuple[float, int] | None:
    """``(S_fixed(B), d)``: the best fixed-depth greedy chain replayed on the ranks (module docstring), each row
    priced alone (``batch_fixed_chain_bound`` over batches of one); None without outputs."""
    return batch_fixed_chain_bound([[seq] for seq in ranks], profile, batch_size, context, max_depth, drafter_cost)


def batch_fixed_chain_bound(
    groups: list[list[list[int]]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> tuple[float, int] | None:
    """``(S_fixed(B), d)`` for static batches (``groups``: each batch's ranks, as the batches ran): a batch runs
    until its slowest row is done, each step costing ``d c_D + c_V(d + 1)``, so with ``s_b(d)`` the steps row
    ``b``'s chain takes::

        S = max_d  sum_groups max_b |y_b| / sum_groups max_b s_b(d) (d c_D + c_V(d + 1))

    None without outputs."""
    if not _has_outputs(groups):
        return None
    c_d, verify = _prices(profile, batch_size, context, max_depth + 1, drafter_cost)
    best: tuple[float, int] = (0.0, 0)
    for depth in range(1, max_depth + 1):
        times = [[_chain_time(seq, [depth] * len(seq), c_d, verify) for seq in group] for group in groups]
        best = max(best, (_batch_speedup(groups, times), depth))
    return best


def _leading_ones(seq: list[int], start: int, limit: int) -> int:
    """How many of ``seq[start:start + limit]`` are rank 1 before the first that is not."""
    n = 0
    while n < limit and start + n < len(seq) and seq[start + n] == 1:
        n += 1
    return n


def confidence_chain_bound(
    ranks: list[list[int]],
    confidences: list[list[float]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> tuple[float, float, int] | None:
    """``(S_conf(B), theta, D)``: the best confidence-stopped chain replayed on the outputs (module docstring), each
    row priced alone (``batch_confidence_chain_bound`` over batches of one).

    None without outputs, or without confidences for them.

    Raises:
        ValueError: ``ranks`` and ``confidences`` of different shapes.
    """
    return batch_confidence_chain_bound(
        [[seq] for seq in ranks], [[conf] for conf in confidences], profile, batch_size, context, max_depth, drafter_cost
    )


def batch_confidence_chain_bound(
    groups: list[list[list[int]]],
    confidences: list[list[list[float]]],
    profile: CostProfile,
    batch_size: int,
    context: int,
    max_depth: int,
    drafter_cost: float | None = None,
) -> tuple[float, float, int] | None:
    """``(S_conf(B), theta, D)`` for static batches (``groups`` and ``confidences``: each batch's ranks and
    teacher-forced top-1 probabilities, as the batches ran). A batch runs until its slowest row is done and a
    batch step costs at least any one row's chain step, so a batch takes at least ``max_b T_b(theta, D)``, row
    ``b``'s own time, where vanilla takes ``max_b |y_b|``::

        S = max_{theta, D}  sum_groups max_b |y_b| / sum_groups max_b T_b(theta, D)

    Strict, for chains, where every row stays in its batch to the end (as ``static_batch_oracle_bound``).

    None without outputs, or without confidences for them.

    Raises:
        ValueError: ``groups`` and ``confidences`` of different shapes.
    """
    if not _has_outputs(groups) or not any(confidences):
        return None
    if [[len(r) for r in g] for g in groups] != [[len(c) for c in g] for g in confidences]:
        raise ValueError("ranks and confidences must hold one value per output token each")
    c_d, verify = _prices(profile, batch_size, context, max_depth + 1, drafter_cost)
    best: tuple[float, float, int] = (0.0, 0.0, 0)
    for theta in CONFIDENCE_THRESHOLDS:
        stops = [[_confidence_stops(conf, theta, max_depth) for conf in group] for group in confidences]
        for cap in range(1, max_depth + 1):
            times = [
                [_chain_time(seq, [min(d, cap) for d in stop], c_d, verify) for seq, stop in zip(group, group_stops)]
                for group, group_stops in zip(groups, stops)
            ]
            best = max(best, (_batch_speedup(groups, times), theta, cap))
    return best


def _confidence_stops(conf: list[float], theta: float, max_depth: int) -> list[int]:
    """Per start ``i``, the depth a chain drafts before the cap: the first ``d`` with ``v_d < theta`` (or ``max_depth``)."""
    n, stops = len(conf), []
    for i in range(n):
        v, d = 1.0, 0
        while i + d < n and d < max_depth:
            v *= conf[i + d]
            d += 1
            if v < theta:
                break
        stops.append(d)
    return stops


def _chain_time(seq: list[int], depths: list[int], c_d: float, verify: np.ndarray) -> float:
    """Plain steps a chain drafting ``depths[i]`` from position ``i`` takes over the output ranked ``seq``."""
    i, time = 0, 0.0
    while i < len(seq):
        d = depths[i]
        time += d * c_d + verify[d + 1]
        i += _leading_ones(seq, i, d) + 1
    return time
