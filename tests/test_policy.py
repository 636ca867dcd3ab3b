"""Algorithm 1, Theorem 4.1, depth pruning and reranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cast_core.cost import CostProfile
from cast_core.drafter import Drafter
from cast_core.forward import prefill_prompts
from cast_core.policy import (
    CastConfig,
    CastPolicy,
    CostContext,
    DepthHistory,
    StaticConfig,
    StaticTreePolicy,
    algorithm1,
    make_policy,
)


def linear_context(per_token_drafter: float, per_token_target: float, horizon: int = 80) -> CostContext:
    """Cost curves of the linear model f(n) = per_token * n (no fixed part)."""
    profile = CostProfile.synthetic(0.0, per_token_target, 0.0, per_token_drafter)
    return CostContext.from_profile(profile, batch_size=1, context=128, max_tokens=horizon)


def test_algorithm1_free_and_costly_steps() -> None:
    utility = np.array([0.0, 0.9, 1.2, 1.3, 1.35])
    flat_then_step = np.array([0.0, 1.0, 1.0, 1.0, 2.0])
    # k=1 pays 0.9 per 1.0 > 0.5; k=2, 3 are free; k=4 adds 0.05 for 1.0
    assert algorithm1(utility, flat_then_step, 0.5) == 3
    # k=1 alone (0.9) fails 1.0, but k=2 and k=3 cost the same step and carry 1.2, 1.3
    assert algorithm1(utility, flat_then_step, 1.0) == 3
    assert algorithm1(utility, flat_then_step, 1.5) == 0


def test_algorithm1_keeps_scanning_past_a_failure() -> None:
    # k=2 alone does not pay for its cost step, but k=3 (same cost) does
    utility = np.array([0.0, 1.0, 1.1, 1.6])
    cost = np.array([0.0, 0.1, 1.1, 1.1])
    assert algorithm1(utility, cost, 0.5) == 3


@settings(max_examples=200, deadline=None)
@given(
    v=st.lists(st.floats(0.001, 1.0), min_size=3, max_size=40).map(lambda x: sorted(x, reverse=True)),
    k=st.integers(1, 39),
    b=st.floats(0.01, 2.0),
)
def test_theorem_4_1_linear_cost_keeps_exactly_top_k(v: list[float], k: int, b: float) -> None:
    """With c_k = b * k and C1 strictly between v_(K+1)/b and v_K/b, breadth pruning keeps top K."""
    if k >= len(v) or not v[k] < v[k - 1] - 1e-9:  # a float-level tie has no threshold strictly between
        return
    c1 = (v[k - 1] + v[k]) / 2 / b
    policy = CastPolicy(CastConfig(c1=c1, top_k=len(v)))
    ctx = CostContext(drafter=b * np.arange(len(v) + 1), target=np.arange(100.0), batch_size=1, context=0)
    assert policy.layer_width(1, np.array([v]), ctx) == k


def test_theorem_4_1_through_a_measured_style_profile() -> None:
    """Same statement through CostProfile interpolation of an affine table."""
    ctx = linear_context(per_token_drafter=0.002, per_token_target=0.01)
    v = np.array([[0.6, 0.2, 0.1, 0.05, 0.03, 0.01]])
    b = ctx.drafter[1]
    for k in range(1, 6):
        policy = CastPolicy(CastConfig(c1=(v[0, k - 1] + v[0, k]) / 2 / b, top_k=6))
        assert policy.layer_width(1, v, ctx) == k


def test_depth_pruning_follows_cost() -> None:
    v = np.array([[0.5, 0.2]])
    histories = [DepthHistory(4)]
    policy = CastPolicy(CastConfig(c2=1.0))
    cheap = CostContext(drafter=np.linspace(0, 0.2, 11), target=np.ones(80), batch_size=1, context=0)
    dear = CostContext(drafter=np.linspace(0, 20.0, 11), target=np.ones(80), batch_size=1, context=0)
    assert policy.grow(1, v, cheap, histories)
    assert not policy.grow(1, v, dear, histories)
    # alpha falls as observed gains fall
    policy.observe_layer(np.array([[0.5, 0.2]]), np.array([[0.01]]), histories)
    assert histories[0].alpha() < 1.0


def test_depth_prices_verifying_one_more_node() -> None:
    """c^(i) = C_D(n_i) + C_T(i + 2) - C_T(i + 1): a layer's best draft pays only once verified. With the same
    drafter, a flat verify curve (B=1 on a CPU) grows a layer that a steep one (B=8: 0.26-0.30 plain steps a
    token on the 2-core AMD EPYC) does not; deeper layers are priced where the chain they extend ends."""
    policy = CastPolicy(CastConfig(c2=1.25, adaptive_thresholds=False))
    drafter = np.r_[0.0, np.full(10, 0.2)]
    flat = CostContext(drafter=drafter, target=np.r_[0.0, np.ones(11)], batch_size=1, context=0)
    steep = CostContext(drafter=drafter, target=np.r_[0.0, 1.0 + 0.28 * np.arange(11)], batch_size=8, context=0)
    kept = np.array([[0.4]])  # 0.4 >= 1.25 * 0.2, but not >= 1.25 * (0.2 + 0.28)
    assert policy.grow(1, kept, flat, [DepthHistory(4)]) and not policy.grow(1, kept, steep, [DepthHistory(4)])
    assert policy.grow(1, np.array([[0.7]]), steep, [DepthHistory(4)])
    bend = CostContext(drafter=drafter, target=np.r_[0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], batch_size=4, context=0)
    assert policy.grow(1, kept, bend, [DepthHistory(4)]), "layer 2: a chain of 3 tokens verifies at a plain step's cost"
    assert not policy.grow(2, kept, bend, [DepthHistory(4)]), "layer 3: the 4th token costs a plain step more"
    assert steep.target_cost(30) == pytest.approx(1.0 + 0.28 * 29), "past the curve's end, its last slope"


def test_depth_prices_the_next_node_where_the_reranker_stops() -> None:
    """With ``verified`` (the nodes of the tree so far that ``verify_count`` would send), the next layer's node is
    priced after them, ``C_T(m + 2) - C_T(m + 1)``: a wide first layer at B=8 already fills the cheap part of a
    bent verify curve, where a chain's price (``verified`` None: ``m = i``) still reads it flat."""
    policy = CastPolicy(CastConfig(c2=1.25, c3=1.0, adaptive_thresholds=False))
    bend = CostContext(drafter=np.r_[0.0, np.full(10, 0.2)], target=np.r_[0.0, 1.0, 1.0, 1.0, 1.0, 1.3, 1.6, 1.9, 2.2, 2.5, 2.8, 3.1], batch_size=8, context=0)
    kept = np.array([[0.3, 0.2, 0.1]])  # utility 0.6: >= 1.25 * 0.2, not >= 1.25 * (0.2 + 0.3)
    m = policy.verify_count(kept, bend)
    assert m == 3, "three nodes and the root verify at a plain step's cost"
    assert policy.grow(1, kept, bend, [DepthHistory(4)]), "priced as a chain's next node, the 3rd token, free"
    assert policy.grow(1, kept, bend, [DepthHistory(4)], verified=1)
    assert not policy.grow(1, kept, bend, [DepthHistory(4)], verified=m), "the 5th token costs 0.3 plain steps"


def test_scaled_depth_threshold_stops_growth_once_c2_rho_cost_exceeds_one() -> None:
    """alpha * u <= 1 (u sums path confidences), so with thresholds scaled by rho^B no second layer grows once
    C2 * rho^B * c_D > 1: with the defaults and a drafter forward of 0.59 plain steps, that is rho^B > 1.36."""
    policy = CastPolicy()
    ctx = CostContext(drafter=np.r_[0.0, np.full(10, 0.59)], target=np.r_[0.0, np.ones(79)], batch_size=1, context=0)
    sure = np.array([[0.99]])
    policy.gate.observe(1, tokens=2.6, cost=2.0)  # rho^1 = 1.3: threshold 1.25 * 1.3 * 0.59 = 0.96
    assert policy.grow(1, sure, ctx, [DepthHistory(4)])
    policy.gate.observe(1, tokens=20.0, cost=2.0)  # rho^1 well above 1.36
    assert policy.gate.speedup(1) > 1 / (policy.config.c2 * 0.59)
    assert not policy.grow(1, np.array([[1.0]]), ctx, [DepthHistory(4)])


def test_reranking_reads_target_cost() -> None:
    conf = np.array([[0.9, 0.8, 0.5, 0.3, 0.1, 0.05]])
    policy = CastPolicy(CastConfig(c3=1.0))
    flat = CostContext(drafter=np.zeros(80), target=np.r_[0.0, np.ones(79)], batch_size=1, context=0)
    assert policy.verify_count(conf, flat) == 6  # verifying more is free
    steep = CostContext(drafter=np.zeros(80), target=np.arange(80.0), batch_size=1, context=0)
    assert policy.verify_count(conf, steep) == 0  # no node pays a full extra decode step


def test_make_policy_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="policy"):
        make_policy("beam")


def _draft(policy, ctx, prompts, seed: int = 0):
    from conftest import tiny_pair

    target, drafter_model = tiny_pair("llama", torch.float64, noise=0.05, seed=seed)
    drafter = Drafter(drafter_model, target.config.vocab_size)
    state = drafter.new_state(len(prompts))
    prefill_prompts(drafter_model, state, prompts)
    return drafter.draft(state, [[p[-1]] for p in prompts], policy, ctx, [policy.new_row_plan() for _ in prompts])


def test_static_tree_shape_is_eagle2() -> None:
    policy = StaticTreePolicy(StaticConfig(top_k=4, depth=3, total_tokens=10))
    result = _draft(policy, None, [[5, 6, 7], [8, 9]])
    tree = result.tree
    tree.validate()
    assert result.nodes_drafted == 12 and result.layers == 3
    assert tree.num_nodes == 11
    assert int(tree.depth.max()) <= 3


def test_cast_depth_stops_when_drafting_is_expensive() -> None:
    cheap = CostContext.from_profile(CostProfile.synthetic(0.1, 0.001, 0.001, 0.0001), 2, 16, 70)
    dear = CostContext.from_profile(CostProfile.synthetic(0.1, 0.001, 1.0, 0.01), 2, 16, 70)
    deep = _draft(CastPolicy(CastConfig(c1=0.5, c2=0.5, c3=0.5)), cheap, [[5, 6, 7], [8, 9]])
    shallow = _draft(CastPolicy(CastConfig(c1=0.5, c2=0.5, c3=0.5)), dear, [[5, 6, 7], [8, 9]])
    assert deep.layers > 1
    assert shallow.layers == 1
    assert int(shallow.tree.depth.max()) <= 1


@pytest.mark.parametrize("seed", range(4))
def test_reranked_tree_is_connected_with_root_children_first(seed: int) -> None:
    ctx = CostContext.from_profile(CostProfile.synthetic(0.05, 0.002, 0.005, 0.0005), 3, 16, 70)
    tree = _draft(CastPolicy(CastConfig(c1=0.3, c2=0.3, c3=0.3)), ctx, [[5, 6, 7], [8], [9, 10, 11, 12]], seed).tree
    tree.validate()  # parents precede children, depths consistent: a connected subtree
    for b in range(tree.batch_size):
        n = int(tree.valid[b].sum())
        if n > 1:
            assert int(tree.parents[b, 1]) == 0  # the most confident node is a child of the root
        conf = tree.confidence[b, 1:n]
        parents = tree.parents[b, 1:n]
        assert bool((conf <= tree.confidence[b][parents]).all())


def _draft_with_budgets(prompts, budgets, seed: int = 0):
    """Draft one step for ``prompts`` whose rows have ``budgets`` tokens left, under cheap costs (deep trees)."""
    from conftest import tiny_pair

    target, drafter_model = tiny_pair("llama", torch.float64, noise=0.5, seed=seed)
    drafter = Drafter(drafter_model, target.config.vocab_size)
    state = drafter.new_state(len(prompts))
    prefill_prompts(drafter_model, state, prompts)
    policy = CastPolicy(CastConfig(c1=0.3, c2=0.3, c3=0.3))
    plans = [policy.new_row_plan(left) for left in budgets]
    ctx = CostContext.from_profile(CostProfile.synthetic(0.05, 0.002, 0.005, 0.0005), 2, 16, 70)  # one price for every call
    return drafter.draft(state, [[p[-1]] for p in prompts], policy, ctx, plans)


@pytest.mark.parametrize("seed", range(3))
def test_trees_are_sized_for_the_rows_with_the_most_tokens_left(seed: int) -> None:
    """Breadth, depth and verified nodes follow the row the batch waits for; the other row gets a tree of that shape."""
    prompts = [[5, 6, 7], [30, 31, 8, 9]]
    for slow in (0, 1):
        budgets = [50 if row == slow else 5 for row in range(2)]
        batch = _draft_with_budgets(prompts, budgets, seed)
        alone = _draft_with_budgets([prompts[slow]], [50], seed)
        assert (batch.layers, batch.tree.tokens.shape[1]) == (alone.layers, alone.tree.tokens.shape[1])
        batch.tree.validate()


def test_decisive_rows_are_the_active_ones_with_the_most_tokens_left() -> None:
    from cast_core.drafter import _decisive_rows

    policy = CastPolicy()
    plans = [policy.new_row_plan(left) for left in (10, 20, 20, None)]
    assert _decisive_rows(plans, np.array([True, True, True, False])).tolist() == [False, True, True, False]
    assert _decisive_rows(plans, np.array([True, True, True, True])).tolist() == [False, False, False, True]  # unbounded: most left


def test_prompts_are_fed_apart_where_padding_them_together_costs_more() -> None:
    """``cost_j = sum_{i <= j} C_D(1, L_i - 1) + C_D(B, W_j)``, the least wins: on a CPU (cost per token and
    row) ragged prompts are each fed alone; where a batched forward costs about what one row's does (a GPU), or
    without a curve for one row, none is; a row holding tokens, or whose chain is cut to a window, never is."""
    from cast_core.drafter import _rows_fed_apart

    n = np.arange(200.0)
    cpu = CostContext(
        drafter=np.where(n > 0, 0.3 + 0.08 * n, 0.0), target=np.ones(10), batch_size=8, context=0,
        drafter_alone=np.where(n > 0, 0.04 + 0.012 * n, 0.0),
    )
    lengths = (60, 68, 51, 49, 55, 186, 60, 54)  # 8 MT-bench prompts
    prompts = [[1] * k for k in lengths]
    rows, cost = _rows_fed_apart(prompts, None, [0] * 8, cpu)
    assert rows == [5, 1, 0, 6, 4, 7, 2, 3] and cost == pytest.approx(sum(0.04 + 0.012 * (k - 1) for k in lengths) + 0.38)
    one_long = [[1] * k for k in (4, 3, 5, 2, 4, 3, 6, 186)]
    assert _rows_fed_apart(one_long, None, [0] * 8, cpu)[0] == [7], "the short ones stay batched"
    held = _rows_fed_apart(prompts, None, [0, 3, 0, 0, 0, 0, 0, 0], cpu)[0]
    assert 5 in held and 1 not in held, "a row holding tokens stays batched"
    assert _rows_fed_apart(prompts, None, [0, 0, 0, 0, 0, 3, 0, 0], cpu)[0] == [], "the longest stays: nothing to save"
    cut = [(0, 0)] * 5 + [(4, 166)] + [(0, 0)] * 2
    assert 5 not in _rows_fed_apart(prompts, cut, [0] * 8, cpu)[0], "a windowed chain stays"
    gpu = CostContext(drafter=1.0 + 0.001 * n, target=np.ones(10), batch_size=8, context=0, drafter_alone=1.0 + 0.0005 * n)
    assert _rows_fed_apart(prompts, None, [0] * 8, gpu) == ([], pytest.approx(1.186))
    unknown = CostContext(drafter=cpu.drafter, target=np.ones(10), batch_size=8, context=0)
    assert _rows_fed_apart(prompts, None, [0] * 8, unknown) == ([], pytest.approx(0.3 + 0.08 * 186))
    assert _rows_fed_apart(prompts, None, [0] * 8, None) == ([], 0.0)


def test_depth_gain_counts_only_the_next_layer_nodes_it_prices() -> None:
    """A wide layer's whole utility is not bought with one verified node: growing pays iff some ``k`` of the next
    layer's nodes (``alpha`` times the ``k`` best kept ``v``) pay for the forward and for verifying those ``k``,
    ``alpha * U_k >= C2 * (C_D(n_i) + C_T(m + 1 + k) - C_T(m + 1))``. Where verifying is free (B=1 on a CPU) that is
    the whole layer; on a steep verify curve (B=8) a wide, unsure layer no longer grows."""
    policy = CastPolicy(CastConfig(c2=1.25, adaptive_thresholds=False))
    drafter = np.r_[0.0, np.full(10, 0.2)]
    flat = CostContext(drafter=drafter, target=np.r_[0.0, np.ones(11)], batch_size=1, context=0)
    steep = CostContext(drafter=drafter, target=np.r_[0.0, 1.0 + 0.28 * np.arange(11)], batch_size=8, context=0)
    wide = np.array([[0.3, 0.2, 0.1]])  # the whole layer, 0.6 >= 1.25 * (0.2 + 0.28): one node's price
    for k, gain in enumerate((0.3, 0.5, 0.6), start=1):
        assert gain < 1.25 * (0.2 + 0.28 * k), f"no {k} of its nodes pay for themselves"
    assert not policy.grow(1, wide, steep, [DepthHistory(4)], verified=1)
    assert policy.grow(1, wide, flat, [DepthHistory(4)], verified=1)
    sure = np.array([[0.7, 0.05, 0.05]])  # its best node alone pays: 0.7 >= 1.25 * 0.48
    assert policy.grow(1, sure, steep, [DepthHistory(4)], verified=1)
