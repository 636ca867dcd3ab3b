"""The drafter's draft vocabulary: a core of leading ids plus the rows' rare context tokens, never a different output."""

from __future__ import annotations

import pytest
import torch

from cast_core import CastConfig, Engine, StaticConfig
from cast_core.cost import CostProfile
from cast_core.drafter import Drafter
from cast_core.forward import forward_logits
from cast_core.kv import KVState
from cast_core.vocab import DraftVocab

from conftest import TINY_EOS, TINY_VOCAB, random_prompts, reference_greedy, tiny_pair

PROFILE = CostProfile.synthetic(0.01, 0.0002, 0.003, 0.0001)
CORE = 16


@pytest.fixture(scope="module")
def models():
    return tiny_pair("qwen2", torch.float32)


def test_head_scores_the_core_then_the_rare_ids_as_the_full_head_does(models) -> None:
    _, drafter = models
    vocab = DraftVocab(drafter, TINY_VOCAB, CORE)
    assert vocab.rare([3, 40, 100, 15, 16, 500]) == {40, 100, 16}
    head = vocab.head({100, 40})
    assert head.ids.tolist() == list(range(CORE)) + [40, 100]
    hidden = torch.randn(2, 3, drafter.config.hidden_size)
    full = drafter.lm_head(hidden)
    torch.testing.assert_close(head.project(hidden), full[..., head.ids])
    torch.testing.assert_close(head.select(full), full[..., head.ids])
    # through the engine's forward: the split-off head's logits are the full forward's at V_D
    ids = torch.tensor([[5, 41, 99]])
    positions = torch.arange(3)[None]
    visible = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    states = [KVState(drafter.config.num_hidden_layers, 1, drafter.device) for _ in range(2)]
    with torch.inference_mode():
        drafted = forward_logits(drafter, states[0], ids, positions, visible, head=head)
        whole = forward_logits(drafter, states[1], ids, positions, visible)
    torch.testing.assert_close(drafted, whole[..., head.ids])


def test_a_core_at_least_the_vocabulary_scores_every_accepted_id(models) -> None:
    _, drafter = models
    assert DraftVocab(drafter, TINY_VOCAB, None).core_size == TINY_VOCAB
    assert DraftVocab(drafter, 100, 4096).core_size == 100  # ids the target does not accept are never scored
    assert DraftVocab(drafter, TINY_VOCAB, 4096).rare([5, 127]) == set()


def test_a_core_size_below_one_names_the_field(models) -> None:
    with pytest.raises(ValueError, match="core_size"):
        Drafter(models[1], TINY_VOCAB, 0)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("policy", ["static", "cast"])
def test_greedy_output_with_a_small_core_equals_the_targets(models, tokenizer, policy: str, batch: int) -> None:
    """With 16 core ids of 128, most target tokens are drafted only from a row's own context, or not at all."""
    target, drafter = models
    prompts = random_prompts(8, max_len=24, seed=5)
    refs = [reference_greedy(target, p, 24, TINY_EOS) for p in prompts]
    engine = Engine(
        target,
        tokenizer,
        drafter,
        policy=policy,
        cost_profile=PROFILE,
        max_batch_size=batch,
        static_config=StaticConfig(top_k=4, depth=4, total_tokens=16),
        cast_config=CastConfig(c1=0.3, c2=0.3, c3=0.3, min_speedup=1e-3),  # trees on every step
        draft_vocab=CORE,
    )
    generations = engine.generate(prompts, max_new_tokens=24)
    assert [g.token_ids for g in generations] == refs
    assert sum(g.stats.accepted_tokens for g in generations) > 0  # drafting still pays off


def test_a_draft_vocabulary_smaller_than_top_k_drafts_from_what_it_has(models, tokenizer) -> None:
    target, drafter = models
    prompt = [1, 3, 3]  # V_D = {0, 1, 3} at the first drafted step, against top_k = 8
    engine = Engine(
        target, tokenizer, drafter, policy="static", cost_profile=PROFILE, static_config=StaticConfig(top_k=8, depth=3, total_tokens=12), draft_vocab=2
    )
    assert engine.generate([prompt], max_new_tokens=12)[0].token_ids == reference_greedy(target, prompt, 12, TINY_EOS)
