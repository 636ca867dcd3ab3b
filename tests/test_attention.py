"""Grouped-query attention (cast_core.attention) against stock sdpa and eager, on tensors and on models."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cast_core.attention import GROUPED_SDPA, grouped_sdpa_attention
from cast_core.kv import KVState


class _Grouped(torch.nn.Module):
    """Stands in for an attention module: all the functions read is ``num_key_value_groups``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("q_len", [1, 2, 7])
def test_grouped_equals_stock_sdpa(groups: int, q_len: int) -> None:
    """Folding each group's query heads into the query axis is the same attention as repeating the KV heads."""
    gen = torch.Generator().manual_seed(groups * 10 + q_len)
    batch, kv_heads, length, dim = 3, 2, 29, 8
    query = torch.randn(batch, q_len, kv_heads * groups, dim, generator=gen, dtype=torch.float64).transpose(1, 2)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    visible = torch.rand(batch, 1, q_len, length, generator=gen) > 0.4
    visible[..., -1] = True  # every query sees something
    mask = _additive(visible, torch.float64)
    stock, _ = sdpa_attention_forward(_Grouped(groups), query, key, value, mask, scaling=0.3)
    grouped, _ = grouped_sdpa_attention(_Grouped(groups), query, key, value, mask, scaling=0.3)
    assert grouped.shape == stock.shape == (batch, q_len, kv_heads * groups, dim)
    torch.testing.assert_close(grouped, stock, atol=1e-12, rtol=1e-12)


def _tiny_qwen(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).to(torch.float64).eval()



def test_a_forward_folds_its_mask_once_and_a_new_mask_is_folded_anew() -> None:
    """Every layer of a forward passes the same mask tensor: the first folds it, the rest reuse that; a new
    mask (the next forward's) is folded from its own values, never served the last one's."""
    gen = torch.Generator().manual_seed(5)
    groups, batch, kv_heads, q_len, length, dim = 3, 2, 2, 4, 11, 8
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=gen, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    for seed in (1, 2):
        visible = torch.rand(batch, 1, q_len, length, generator=torch.Generator().manual_seed(seed)) > 0.5
        visible[..., -1] = True
        mask = _additive(visible, torch.float64)
        first, _ = grouped_sdpa_attention(_Grouped(groups), query, key, value, mask, scaling=0.3)
        folded = mask._cast_folded[1]
        again, _ = grouped_sdpa_attention(_Grouped(groups), query, key, value, mask, scaling=0.3)
        assert mask._cast_folded[1] is folded
        stock, _ = sdpa_attention_forward(_Grouped(groups), query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(first, stock, atol=1e-12, rtol=1e-12)
        assert torch.equal(again, first)

def test_tree_forward_matches_stock_attention() -> None:
    """A tree of 5 nodes per row over a cached prefix gives stock sdpa's logits under the grouped path, and
    eager's within its float32 softmax."""
    models = {attn: _tiny_qwen(attn) for attn in (GROUPED_SDPA, "sdpa", "eager")}
    prefix = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    tree = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    parents = [-1, 0, 0, 1, 3]  # node i attends to itself and its ancestors
    visible = torch.eye(5, dtype=torch.bool)
    for node, parent in enumerate(parents):
        while parent >= 0:
            visible[node, parent], parent = True, parents[parent]
    depth = visible.sum(1) - 1
    logits = {}
    for attn, model in models.items():
        state = KVState(model.config.num_hidden_layers, 2)
        state.forward(model, prefix, torch.arange(9).expand(2, -1), torch.ones(9, 9, dtype=torch.bool).tril().expand(2, -1, -1))
        state.commit([list(range(9))] * 2)
        logits[attn] = state.forward(model, tree, (9 + depth).expand(2, -1), visible.expand(2, -1, -1))
    torch.testing.assert_close(logits[GROUPED_SDPA], logits["sdpa"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logits[GROUPED_SDPA], logits["eager"], atol=1e-6, rtol=1e-6)


def test_generate_with_padding_matches_sdpa() -> None:
    """transformers' own ``generate`` on a left-padded batch (2D mask) runs unchanged with the grouped attention."""
    ids = torch.tensor([[0, 0, 5, 9, 11], [7, 3, 8, 20, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = {
        attn: _tiny_qwen(attn).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for attn in (GROUPED_SDPA, "sdpa")
    }
    assert torch.equal(out[GROUPED_SDPA], out["sdpa"])
