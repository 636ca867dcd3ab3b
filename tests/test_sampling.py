"""Speculative sampling follows the target distribution (chi-square on the first two tokens)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cast_core import CastConfig, Engine, SamplingParams, StaticConfig
from cast_core.cost import CostProfile
from cast_core.policy import CastPolicy
from cast_core.sampling import target_probs

from conftest import TINY_EOS, tiny_pair, tiny_tokenizer

VOCAB = 8
PROMPT = [3, 4, 5]
REPEATING = [5, 3, 4, 5]  # context lookup drafts 3, 4, 5 after the last 5 (what followed the first)
SAMPLES = 3000


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square(df), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(observed: Counter, expected: dict, n: int) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5 (the rest pooled)."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in expected.items():
        e = p * n
        if e >= 5:
            stat += (observed.get(cell, 0) - e) ** 2 / e
            df += 1
        else:
            pooled_obs += observed.get(cell, 0)
            pooled_exp += e
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    return stat, df


def joint_first_two(model: torch.nn.Module, params: SamplingParams, prompt: list[int] = PROMPT) -> dict:
    """Exact P(first two tokens after ``prompt``); an EOS first token ends the sequence: cell (EOS, None)."""
    with torch.no_grad():
        p1 = target_probs(model(input_ids=torch.tensor([prompt], device=model.device)).logits[0, -1], params)
        out = {}
        for x1 in range(VOCAB):
            if p1[x1] == 0:
                continue
            if x1 == TINY_EOS:
                out[(x1, None)] = float(p1[x1])
                continue
            p2 = target_probs(model(input_ids=torch.tensor([prompt + [x1]], device=model.device)).logits[0, -1], params)
            for x2 in range(VOCAB):
                out[(x1, x2)] = float(p1[x1] * p2[x2])
    return out


@pytest.fixture(scope="module")
def models():
    return tiny_pair("llama", torch.float32, vocab_size=VOCAB, noise=0.3, peak=2.0, seed=4)


LOOSE_CAST = CastConfig(top_k=3, max_depth=3, c1=0.2, c2=0.2, c3=0.2, min_speedup=1e-3)
STATIC = StaticConfig(top_k=3, depth=2, total_tokens=8)
CASES = [
    ("static", SamplingParams(temperature=1.0), STATIC, None, PROMPT),
    ("cast", SamplingParams(temperature=1.0), LOOSE_CAST, None, PROMPT),
    ("static", SamplingParams(temperature=0.7, top_p=0.9, top_k=5), STATIC, None, PROMPT),
    # a draft vocabulary of 4 core ids: drafts of ids 4..7 come only from the prompt's rare tokens (4, 5)
    ("cast", SamplingParams(temperature=1.0), LOOSE_CAST, 4, PROMPT),
    # context lookup grafts 3, 4, 5 onto every first tree
    ("cast", SamplingParams(temperature=1.0), LOOSE_CAST, None, REPEATING),
    # ... or is verified alone, without a drafter forward
    ("cast", SamplingParams(temperature=1.0), LOOSE_CAST.model_copy(update={"lookup_only": True}), None, REPEATING),
]


@pytest.mark.parametrize(
    ("policy", "params", "config", "draft_vocab", "prompt"),
    CASES,
    ids=["static-T1", "cast-T1", "static-T0.7-p0.9-k5", "cast-T1-core4", "cast-T1-lookup", "cast-T1-lookup-only"],
)
def test_first_two_tokens_follow_target(models, policy, params, config, draft_vocab, prompt) -> None:
    target, drafter = models
    tree_policy = CastPolicy(config) if policy == "cast" else policy
    engine = Engine(
        target,
        tiny_tokenizer(VOCAB),
        drafter,
        policy=tree_policy,
        cost_profile=CostProfile.synthetic(0.01, 0.0001, 0.002, 0.0001),
        max_batch_size=100,
        static_config=config if policy == "static" else None,
        draft_vocab=draft_vocab,
    )
    gens = engine.generate(
        [prompt] * SAMPLES,
        max_new_tokens=2,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=1234,
    )
    observed = Counter()
    for g in gens:
        ids = g.token_ids + [TINY_EOS]  # a sequence shorter than 2 tokens ended with EOS
        observed[(TINY_EOS, None) if ids[0] == TINY_EOS else (ids[0], ids[1])] += 1
    expected = joint_first_two(target, params, prompt)
    assert set(observed) <= set(expected), "sampled a token outside the target's support"
    stat, df = chi2_statistic(observed, expected, SAMPLES)
    assert stat < chi2_critical(df), f"chi2={stat:.1f} df={df}"
    # the trees really branched: more verified nodes per step than a 2-token chain
    steps = sum(g.stats.steps for g in gens)
    assert sum(g.stats.verified_tokens for g in gens) / steps > 3
    assert sum(g.stats.accepted_tokens for g in gens) > 0
    if prompt == REPEATING and config.lookup_only:
        assert sum(g.stats.lookup_steps for g in gens) > 0  # the lookup alone was verified
    elif prompt == REPEATING:
        assert tree_policy.lookup_gain != 1.0  # lookup nodes were grafted

    # power check: the drafter's own distribution, sampled as many times, fails the same test
    rng = np.random.default_rng(0)
    wrong = joint_first_two(drafter, params, prompt)
    cells = list(wrong)
    draws = rng.choice(len(cells), size=SAMPLES, p=np.array([wrong[c] for c in cells]) / sum(wrong.values()))
    control = Counter(cells[i] for i in draws)
    control_stat, control_df = chi2_statistic(control, expected, SAMPLES)
    assert control_stat > chi2_critical(control_df)


def test_seeded_sampling_is_reproducible(models) -> None:
    target, drafter = models
    engine = Engine(target, tiny_tokenizer(VOCAB), drafter, policy="static", static_config=StaticConfig(top_k=3, depth=2, total_tokens=8))
    a = engine.generate([PROMPT] * 4, max_new_tokens=6, temperature=1.0, seed=7)
    b = engine.generate([PROMPT] * 4, max_new_tokens=6, temperature=1.0, seed=7)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_tiny_temperature_is_a_point_mass_not_nan(temperature: float) -> None:
    """logits / T overflows for a tiny T; the distribution is still the argmax's point mass."""
    logits = torch.tensor([[3.0, 7.5, -2.0, 7.0], [0.0, -1.0, -50.0, 1.0]])
    probs = target_probs(logits, SamplingParams(temperature=temperature))
    assert not bool(probs.isnan().any())
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_tiny_temperature_sampling_through_the_engine_is_greedy(tokenizer) -> None:
    """Speculative sampling at T = 1e-300 runs (no nan) and reproduces greedy output exactly."""
    target, drafter = tiny_pair("llama", torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    engine = Engine(target, tokenizer, drafter, policy="cast", cost_profile=CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001))
    sampled = engine.generate(prompts, max_new_tokens=16, temperature=1e-300, seed=3)
    greedy = engine.generate(prompts, max_new_tokens=16)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_acceptance_breaks_ties_towards_the_first_id_as_argmax_does(dtype: torch.dtype) -> None:
    """Tied maxima (common in bf16 logits) resolve to the lowest id, as the target's own greedy decoding
    (``argmax``) resolves them: a chain drafting the lower tied id is accepted, the higher one is not."""
    from cast_core.acceptance import accept_greedy
    from cast_core.tree import DraftTree

    vocab = 151936
    logits = torch.zeros(1, 3, vocab, dtype=dtype)
    logits[0, 0, [7, 90000, 150000]] = 4.0  # root: three tied maxima
    logits[0, 1, [11, 12]] = 2.0  # after the first draft: two tied maxima
    tree = DraftTree.chains(torch.tensor([1]), [[7, 11]])
    assert accept_greedy(tree, logits[0], 0).tokens == [7, 11, int(logits[0, 2].argmax())]
    assert int(logits[0, 0].argmax()) == 7
    higher = DraftTree.chains(torch.tensor([1]), [[90000, 11]])
    assert accept_greedy(higher, logits[0], 0).tokens == [7]
