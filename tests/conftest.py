"""Shared fixtures: tiny models built from a config with a fixed seed, and their tokenizer.

The tiny target has peaked logits (a scaled LM head) so greedy decoding has
clear winners; the tiny drafter is the target with small weight noise, so it
agrees often but not always (both acceptance and rejection paths run).

The tiny models run on ``$CAST_TEST_DEVICE`` (default ``cpu``): ``CAST_TEST_DEVICE=cuda pytest
tests/test_engine.py tests/test_sampling.py`` holds the engine to the target's own output on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from cast_core.attention import GROUPED_SDPA

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and a spinning OpenMP pool is
# 10-20x slower when another process (a Ray replica, a second test) shares the cores.
torch.set_num_threads(1)

TINY_VOCAB = 128
TINY_EOS = 2
TEST_DEVICE = os.environ.get("CAST_TEST_DEVICE", "cpu")


def tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``t0 .. t{V-1}`` (``t2`` is EOS)."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{TINY_EOS}", unk_token="t0", bos_token="t1")


def tiny_pair(
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    vocab_size: int = TINY_VOCAB,
    noise: float = 0.02,
    peak: float = 30.0,
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(target, drafter): a tiny random target and a noisy copy of it as drafter, both with the
    grouped-query attention :func:`cast_core.models.load_model` gives real models, on ``TEST_DEVICE``."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=TINY_EOS,
        bos_token_id=1,
        tie_word_embeddings=False,
        attn_implementation=GROUPED_SDPA,
    )
    config = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    cls = LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM
    torch.manual_seed(seed)
    target = cls(config).to(dtype).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(peak)
    drafter = cls(config).to(dtype).eval()
    drafter.load_state_dict(target.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * noise)
    target.requires_grad_(False)
    drafter.requires_grad_(False)
    return target.to(TEST_DEVICE), drafter.to(TEST_DEVICE)


def random_prompts(n: int, vocab_size: int = TINY_VOCAB, max_len: int = 20, seed: int = 1) -> list[list[int]]:
    """``n`` prompts of mixed lengths 1..max_len over non-special ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab_size, (k,), generator=gen).tolist() for k in lengths]


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """transformers' own greedy ``generate`` on one prompt, EOS removed."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    if eos is not None and eos in out:
        out = out[: out.index(eos)]
    return out


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_models_fp32() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_pair("llama", torch.float32)


@pytest.fixture(scope="session")
def tiny_models_fp64() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_pair("llama", torch.float64)
