"""Unit tests for cast_core.models: loading tiny models/tokenizers and the compatibility check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from cast_core import fetch
from cast_core.attention import GROUPED_SDPA
from cast_core.models import (
    check_tokenizers_compatible,
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from cast_core.packing import is_packed, packing_supported

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _save_tiny(config_cls: type, folder: Path) -> dict[str, torch.Tensor]:
    """Build a seeded tiny causal LM from a config, save it as safetensors; return its weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**TINY), dtype=torch.float32)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _word_tokenizer(words: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``["<unk>", "<s>", "</s>", *words]``."""
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special)


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", torch.bfloat16])
def test_load_model_roundtrip(tmp_path: Path, config_cls: type, dtype: str | torch.dtype) -> None:
    weights = _save_tiny(config_cls, tmp_path)
    model = load_model(tmp_path, dtype=dtype, pack_weights=False)
    expected_dtype = resolve_dtype(dtype)
    assert model.dtype == expected_dtype
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == GROUPED_SDPA
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor.to(expected_dtype)), name
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, TINY["vocab_size"])
    packed = load_model(tmp_path, dtype=dtype)  # bf16 on a CPU: packed weights (cast_core.packing), the same logits
    assert is_packed(packed) == (expected_dtype == torch.bfloat16 and packing_supported())
    assert torch.equal(packed(torch.tensor([[1, 5, 7]])).logits, logits)


def test_load_model_float32_is_deterministic(tmp_path: Path) -> None:
    _save_tiny(LlamaConfig, tmp_path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    a, b = load_model(tmp_path)(ids).logits, load_model(tmp_path)(ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["int8", "fp32", "float", torch.int64, 32])
def test_unknown_dtype_names_the_field(tmp_path: Path, bad: object) -> None:
    _save_tiny(LlamaConfig, tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype=bad)  # type: ignore[arg-type]


def test_bad_device_and_paths(tmp_path: Path) -> None:
    _save_tiny(LlamaConfig, tmp_path / "m")
    with pytest.raises(ValueError, match="device"):
        load_model(tmp_path / "m", device="quantum:0")
    with pytest.raises(FileNotFoundError, match="path"):
        load_model(tmp_path / "missing")
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"x")
    with pytest.raises(ValueError, match="path"):
        load_model(stray)


def test_load_tokenizer_roundtrip(tmp_path: Path) -> None:
    tok = _word_tokenizer(["def", "fib", "(", ")", ":"], bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded("def fib ( ) :")["input_ids"] == tok("def fib ( ) :")["input_ids"]


def test_identical_tokenizers_are_compatible() -> None:
    words = ["a", "b", "c"]
    check_tokenizers_compatible(
        _word_tokenizer(words, eos_token="</s>", pad_token="</s>"),
        _word_tokenizer(words, eos_token="</s>", pad_token="</s>"),
    )


@pytest.mark.parametrize(
    ("drafter_words", "match"),
    [
        (["a", "b", "c", "d"], "1 only in the drafter"),
        (["a", "b"], "1 tokens only in the target"),
        (["b", "a", "c"], "2 with different ids"),
    ],
    ids=["extra", "missing", "reordered"],
)
def test_different_vocab_is_rejected(drafter_words: list[str], match: str) -> None:
    target = _word_tokenizer(["a", "b", "c"], eos_token="</s>")
    drafter = _word_tokenizer(drafter_words, eos_token="</s>")
    with pytest.raises(ValueError, match="drafter") as info:
        check_tokenizers_compatible(target, drafter)
    assert match in str(info.value)


@pytest.mark.parametrize("attr", ["eos", "bos", "pad"])
def test_different_special_ids_are_rejected(attr: str) -> None:
    target = _word_tokenizer(["a"], **{f"{attr}_token": "</s>"})
    drafter = _word_tokenizer(["a"], **{f"{attr}_token": "<s>"})
    with pytest.raises(ValueError, match=f"drafter {attr}_token_id"):
        check_tokenizers_compatible(target, drafter)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAST_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CAST_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "cast"


def test_resolve_model(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path
    # A known name whose converted folder carries a valid marker resolves without fetching.
    spec = fetch.KNOWN_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / spec.name
    folder.mkdir()
    (folder / fetch.MARKER_FILE).write_text(json.dumps({"source_sha256": spec.sha256}))
    assert resolve_model(spec.name, cache_dir=tmp_path) == folder
    with pytest.raises(ValueError, match="qwen2.5-coder-1.5b-instruct"):
        resolve_model("no-such-model", cache_dir=tmp_path)
