"""Context lookup: the index, the uncommitted look-ahead forward, grafting onto the tree, drafter-free steps, and greedy equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cast_core import CastConfig, Engine
from cast_core.cost import CostProfile
from cast_core.drafter import _graft_lookup
from cast_core.forward import feed_chain, feed_chain_ahead
from cast_core.kv import KVState
from cast_core.lookup import ContextIndex, LookupAcceptance, lookup_gain
from cast_core.policy import CastPolicy, CostContext, LookupStep
from cast_core.tree import DraftTree

from conftest import TINY_EOS, reference_greedy, tiny_pair, tiny_tokenizer

PROFILE = CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001)


def _index(tokens: list[int], max_ngram: int = 3) -> ContextIndex:
    index = ContextIndex(max_ngram)
    index.extend(tokens)
    return index


def test_continuation_follows_the_longest_repeated_suffix() -> None:
    # suffix (1, 2) occurred at 0..1 (the 3-gram (9, 1, 2) did not): what followed it there
    assert _index([1, 2, 3, 9, 1, 2]).continuation(3) == [3, 9, 1]
    # a 2-gram beats a more recent 1-gram
    assert _index([4, 1, 5, 8, 1, 6, 4, 1]).continuation(2) == [5, 8]
    # no earlier occurrence of any suffix
    assert _index([1, 2, 3]).continuation(4) == []
    assert _index([]).continuation(4) == []


def test_continuation_takes_the_most_recent_occurrence_and_stops_at_the_end() -> None:
    assert _index([1, 5, 1, 6, 1], max_ngram=1).continuation(2) == [6, 1]
    assert _index([7, 8, 7]).continuation(5) == [8, 7]
    assert _index([7, 7]).continuation(3) == [7]
    assert _index([1, 2, 1, 2]).continuation(0) == []


def test_continuation_sees_tokens_appended_later() -> None:
    index = _index([3, 4, 5])
    assert index.continuation(2) == []
    index.extend([6, 4])
    assert index.continuation(2) == [5, 6]


def test_bad_max_ngram_names_the_field() -> None:
    with pytest.raises(ValueError, match="max_ngram"):
        ContextIndex(0)


def test_lookup_config_fields_are_checked() -> None:
    for field, value in (("lookup_tokens", -1), ("lookup_tokens", 33), ("lookup_ngram", 0)):
        with pytest.raises(ValueError, match=field):
            CastConfig(**{field: value})


def test_tokens_fed_ahead_are_priced_but_not_committed() -> None:
    """Logits at the chain's end and at each ahead token match a plain forward over chain + ahead; the
    cache afterwards holds the chains alone (the next forward matches one after ``feed_chain``)."""
    model, _ = tiny_pair("llama", torch.float32)
    chains, ahead = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    state = KVState(model.config.num_hidden_layers, 2)
    logits = feed_chain_ahead(model, state, chains, ahead)
    assert logits is not None and logits.shape[:2] == (2, 3)
    for b in range(2):
        full = model(input_ids=torch.tensor([chains[b] + ahead[b]])).logits[0]
        n = len(chains[b])
        for j in range(len(ahead[b])):
            torch.testing.assert_close(logits[b, j], full[n - 1 + j], atol=1e-4, rtol=1e-4)
    plain = KVState(model.config.num_hidden_layers, 2)
    feed_chain(model, plain, chains, want_last=False)
    assert state.next_pos.tolist() == plain.next_pos.tolist() == [3, 1]
    nxt = [[14], [15]]
    torch.testing.assert_close(feed_chain(model, state, nxt, want_last=True), feed_chain(model, plain, nxt, want_last=True), atol=1e-4, rtol=1e-4)


def test_ahead_tokens_need_a_chain() -> None:
    model, _ = tiny_pair("llama", torch.float32)
    with pytest.raises(ValueError, match="ahead"):
        feed_chain_ahead(model, KVState(model.config.num_hidden_layers, 2), [[5], []], [[], [6]])


def test_graft_extends_the_deepest_drafted_node_of_the_lookup_path() -> None:
    """Row 0's lookup 5, 7, 9, 4 was drafted down to 5 -> 7 (tree node 3, depth 2), so 9 and 4 are grafted
    below it with v = v(parent) * p; row 1 has no lookup and gets padding."""
    # drafted nodes (tree nodes 1..3): 5 (root's child, v .8), 6 (root's child, v .1), 7 (child of 5, v .6)
    conf = torch.tensor([[0.8, 0.1, 0.6], [0.8, 0.1, 0.6]])
    deepest = np.array([[3, 0], [2, 0]])
    ahead_p = torch.tensor([[0.9, 0.7, 0.5, 0.4], [0.0, 0.0, 0.0, 0.0]])
    (g_tok, g_par, g_depth, g_conf), valid = _graft_lookup(3, conf, deepest, [[5, 7, 9, 4], []], ahead_p)
    assert g_tok.tolist() == [[9, 4], [0, 0]]
    assert g_par.tolist() == [[3, 4], [0, 0]]  # 9 under tree node 3 (the 7); 4 under the grafted 9 (tree node 3 + 1)
    assert g_depth.tolist() == [[3, 4], [0, 0]]
    torch.testing.assert_close(g_conf, torch.tensor([[0.6 * 0.5, 0.6 * 0.5 * 0.4], [0.0, 0.0]]))
    assert valid.tolist() == [[True, True], [False, False]]


def test_graft_stops_where_the_drafter_gives_no_mass() -> None:
    deepest = np.zeros((2, 1), dtype=np.int64)  # the lookup 8, 9 leaves the root at once
    (g_tok, *_), valid = _graft_lookup(1, torch.tensor([[0.5]]), deepest, [[8, 9]], torch.tensor([[0.0, 0.9]]))
    assert g_tok.shape == (1, 0) and valid.shape == (1, 0)


def test_lookup_gain_counts_accepted_tokens_below_the_drafted_tree() -> None:
    """``max(0, L - d)``: the accepted drafts' common prefix with the lookup, less the depth the drafted tree covered."""
    assert lookup_gain([5, 7, 9, 4, 2], [5, 7, 9, 4, 8], covered=2) == 2  # 9 and 4 came from grafted nodes
    assert lookup_gain([5, 7, 9], [5, 7, 9, 4], covered=3) == 0  # the drafted tree held all of it
    assert lookup_gain([5, 6], [5, 7, 9], covered=0) == 1  # accepted up to where it parted from the lookup
    assert lookup_gain([], [5, 7], covered=0) == 0  # nothing accepted
    assert lookup_gain([5, 7], [], covered=0) == 0  # this row had no lookup


def test_lookup_is_fed_only_where_its_utility_beats_its_price() -> None:
    """``g > C1 * (C_D(w_fed) - C_D(w))``; a lookup that does not pay is probed after ``ΔC_D / lookup_probe_budget`` steps."""
    policy = CastPolicy(CastConfig(adaptive_thresholds=False, lookup_probe_budget=0.1))
    cheap = CostContext(drafter=np.linspace(0, 0.5, 11), target=np.arange(80.0), batch_size=1, context=0)
    dear = CostContext(drafter=np.linspace(0, 20.0, 11), target=np.arange(80.0), batch_size=1, context=0)
    assert policy.use_lookup(1, 9, cheap)  # 0.4 plain steps for an expected 1.0
    assert not policy.use_lookup(1, 9, dear)  # 16 plain steps: a probe would wait 160 steps
    assert policy.lookup_gain == 1.0
    policy.observe_lookup(0.2)
    assert policy.lookup_gain == pytest.approx(0.8)
    mid = CostContext(drafter=np.linspace(0, 1.25, 11), target=np.arange(80.0), batch_size=1, context=0)
    fed = [policy.use_lookup(1, 9, mid) for _ in range(21)]  # 1.0 plain steps for an expected 0.8
    assert [i for i, f in enumerate(fed) if f] == [8, 18]  # every 10th step; the first counted the dear one too
    assert policy.lookup_gain == pytest.approx(0.8)  # not fed, not measured
    assert not CastPolicy(CastConfig(lookup_tokens=0)).use_lookup(1, 9, cheap)


def repeating_prompts(batch: int) -> list[list[int]]:
    """Prompts that repeat themselves, so every row has a context lookup from its first step."""
    gen = torch.Generator().manual_seed(5)
    prompts = []
    for _ in range(batch):
        piece = torch.randint(3, 40, (6,), generator=gen).tolist()
        prompts.append(piece + [7] + piece + [8] + piece[:3])
    return prompts


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_output_with_grafted_lookup_equals_the_targets(batch: int) -> None:
    """With drafter-free steps off, the lookup grafts nodes onto the drafter's trees at once; the output is still the target's greedy one."""
    target, drafter = tiny_pair("llama", torch.float32, noise=0.05)
    prompts = repeating_prompts(batch)
    policy = CastPolicy(CastConfig(c1=0.5, c2=0.5, c3=0.5, min_speedup=1e-3))
    engine = Engine(target, tiny_tokenizer(), drafter, policy=policy, cost_profile=PROFILE, max_batch_size=batch)
    outs = engine.generate(prompts, max_new_tokens=24)
    assert [g.token_ids for g in outs] == [reference_greedy(target, p, 24, TINY_EOS) for p in prompts]
    assert policy.lookup_gain != 1.0  # lookup nodes were grafted
    assert all(g.stats.lookup_steps == 0 for g in outs)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_output_with_drafter_free_lookup_steps_equals_the_targets(batch: int) -> None:
    """Steps that verify the lookups alone (no drafter forward) mix with drafted ones; the output is the target's greedy one."""
    target, drafter = tiny_pair("llama", torch.float32, noise=0.05)
    prompts = repeating_prompts(batch)
    policy = CastPolicy(CastConfig(c1=0.5, c2=0.5, c3=0.5, min_speedup=1e-3, lookup_only=True))
    engine = Engine(target, tiny_tokenizer(), drafter, policy=policy, cost_profile=PROFILE, max_batch_size=batch)
    outs = engine.generate(prompts, max_new_tokens=24)
    assert [g.token_ids for g in outs] == [reference_greedy(target, p, 24, TINY_EOS) for p in prompts]
    assert all(g.stats.lookup_steps > 0 for g in outs)
    assert any(g.stats.drafter_forwards > 0 for g in outs)  # drafted steps too


def test_lookup_only_length_weighs_measured_acceptance_against_verify_cost() -> None:
    """``rate(L) = mean_r (1 + E_n(min(L, |a_r|))) / C_T(1 + L)`` must beat the baseline; acceptance is learnt per matched n."""
    policy = CastPolicy(CastConfig(adaptive_thresholds=False, lookup_tokens=4, lookup_only=True))
    flat = CostContext(drafter=np.linspace(0, 0.5, 11), target=np.array([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), batch_size=1, context=0)
    steep = CostContext(drafter=np.linspace(0, 0.5, 11), target=np.arange(8.0), batch_size=1, context=0)
    guess = [([5, 6, 7, 8], 3)]
    assert policy.lookup_only_length(guess, flat, baseline=1.0) == 4  # free tokens: verify them all (prior 0.7^j)
    assert policy.lookup_only_length(guess, steep, baseline=1.0) == 0  # each token costs a plain step
    assert policy.lookup_only_length(guess, flat, baseline=3.0) == 0  # drafting yields more
    for _ in range(50):  # lookups matched on 3 tokens were never accepted
        policy.observe_lookup_step(LookupStep(1, 3, [5, 6, 7, 8]), [9])
    assert policy.lookup_only_length(guess, flat, baseline=1.05) == 0
    assert policy.lookup_only_length([([5, 6], 2)], flat, baseline=1.05) == 2  # n = 2 still has its prior
    assert not CastPolicy(CastConfig(lookup_only=False)).lookup_only_length(guess, flat, baseline=1.0)


def test_lookup_acceptance_counts_only_tokens_a_lookup_had() -> None:
    stats = LookupAcceptance(max_ngram=3, max_tokens=4)
    stats.observe(2, 2, 1)  # a 2-token lookup whose first token was accepted
    assert stats.chance(2, 1) == pytest.approx((1 + 0.7) / 2)
    assert stats.chance(2, 2) == pytest.approx(0.49 / 2)
    assert stats.chance(2, 3) == pytest.approx(0.7**3)  # no lookup that long yet: the prior alone
    assert stats.expected(2, 2) == pytest.approx(stats.chance(2, 1) + stats.chance(2, 2))
    assert LookupStep(1, 2, [4, 5, 6]).accepted([4, 5, 9]) == 2


def test_drafter_free_chain_tree() -> None:
    tree = DraftTree.chains(torch.tensor([1, 2]), [[4, 5], []])
    assert tree.tokens.tolist() == [[1, 4, 5], [2, 0, 0]]
    assert tree.parents.tolist() == [[-1, 0, 1], [-1, 0, 0]]
    assert tree.depth.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert tree.valid.tolist() == [[True, True, True], [True, False, False]]
    assert tree.sizes() == [3, 1]
