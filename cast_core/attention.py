"""Grouped-query attention for many new tokens without copying the KV cache.

Verifying a tree (and drafting a layer of one) runs ``q > 1`` new tokens per
row against a long cache under an explicit 4D mask. For that case stock
``sdpa`` attention in transformers expands each key/value head to the
``g = H / H_kv`` query heads that share it (``repeat_kv``) before calling
``scaled_dot_product_attention``: every layer of every such forward writes and
reads ``g`` copies of the whole cache (Qwen2.5-1.5B: ``g = 6``, B=8, 768
cached tokens: 1.3 GB over its 28 layers), which made a 2-token verify cost
about 1.8 plain steps at B=8 where the weights it reads are the same.

Here the ``g`` query heads of a group are folded into the query axis
instead, so each group attends to its one key/value head::

    Q [B, H, q, d]  ->  Q' [B, H_kv, g q, d]      (head h = k g + r  ->  row r q + i)
    M [B, 1, q, L]  ->  M' [B, 1, g q, L]         (row r q + i of M' = row i of M)
    O' = softmax(Q' K^T * scale + M') V  ->  O [B, q, H, d]

which is the same attention, term for term. A single new token (``q = 1``),
a model without groups, and calls without a mask keep the stock path. Every
layer of a forward gets the same mask tensor, so ``M'`` is built once per
forward and kept on that tensor (it goes when the mask does).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: the ``attn_implementation`` name models are loaded with (:func:`cast_core.models.load_model`)
GROUPED_SDPA = "cast_grouped_sdpa"


def _folded_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``M'`` for ``mask`` (module docstring), built by the first layer that asks and kept on ``mask`` for the rest."""
    cached = getattr(mask, "_cast_folded", None)
    if cached is not None and cached[0] == groups:
        return cached[1]
    folded = mask.repeat(1, 1, groups, 1)
    mask._cast_folded = (groups, folded)
    return folded


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query [B, H, q, d]`` over ``key``/``value [B, H_kv, L, d]`` under ``attention_mask [B, 1, q, L]``.

    Returns ``[B, q, H, d]`` as transformers' attention functions do. With ``g = H / H_kv > 1``, ``q > 1`` and a
    mask shared by all heads, the groups are folded into the query axis (module docstring); otherwise this is
    stock ``sdpa``.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    shared_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    if groups == 1 or q_len == 1 or not shared_mask or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    kv_heads = key.shape[1]
    folded = query.reshape(batch, kv_heads, groups * q_len, dim)
    mask = _folded_mask(attention_mask, groups)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # 2D masks (``generate``) are built as for sdpa
