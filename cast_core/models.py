"""Loading target and drafter models and their tokenizers.

A model source is either a local Hugging Face folder (``config.json`` +
safetensors, e.g. one converted by :mod:`cast_core.fetch`) or a single ``.gguf``
file (dequantised by transformers at load time — slow, use the converted folder
where possible). :func:`resolve_model` turns a path or a known short name into a
folder, fetching the known models on first use.

Models are returned in eval mode, with gradients off and ``sdpa`` attention
that attends grouped query heads to their shared key/value head without
copying the cache (:mod:`cast_core.attention`); it takes the boolean/additive
4D tree masks the verifier passes.
A drafter may run with int8 linear layers (:func:`load_drafter`, :mod:`cast_core.quantize`).
A drafter must share the target's tokenizer (:func:`check_tokenizers_compatible`);
embedding matrices may still differ in size (padding rows), which is fine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cast_core.attention import GROUPED_SDPA
from cast_core.fetch import KNOWN_MODELS, default_cache_dir, fetch_model
from cast_core.packing import pack_linears
from cast_core.quantize import MIXED_DENSE_ROWS, quantize_linears, resolve_quantization

__all__ = [
    "AUTO_DTYPE",
    "DTYPES",
    "add_dtype_arg",
    "check_dtype_name",
    "check_tokenizers_compatible",
    "default_cache_dir",
    "load_drafter",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_model",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
"""Accepted model dtypes by name (float64 is for bit-exact tests on tiny models)."""

AUTO_DTYPE = "auto"
"""The dtype name that stands for the device's native one (``cast_core.cost.native_dtype``)."""


def check_dtype_name(dtype: str) -> str:
    """``dtype`` if it names one of :data:`DTYPES` or is ``auto``; else ``ValueError`` naming the ``dtype`` field."""
    if dtype not in DTYPES and dtype != AUTO_DTYPE:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)} or {AUTO_DTYPE}; got {dtype!r}")
    return dtype


def add_dtype_arg(parser: argparse.ArgumentParser, default: str | None = AUTO_DTYPE) -> None:
    """``--dtype {float32,bfloat16,float16,float64,auto}``, as the CLI commands that load a model take it
    (``default`` None: unset unless given, for a config file's value to stand)."""
    parser.add_argument(
        "--dtype",
        default=default,
        choices=[*DTYPES, AUTO_DTYPE],
        help="model dtype; auto (default): bfloat16 where the device multiplies it natively (GPUs, CPUs with "
        "AVX-512 bf16 or AMX), else float32 (other CPUs emulate bf16 matmuls: a batch of 16 forwards in about 3x fp32's time)",
    )


_SPECIAL_IDS = ("eos_token_id", "bos_token_id", "pad_token_id")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map a dtype name from :data:`DTYPES` or a floating ``torch.dtype`` to a ``torch.dtype``.

    Raises:
        ValueError: naming the ``dtype`` field, for anything else.
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype: unsupported value {dtype!r}; expected one of {', '.join(DTYPES)} "
        "(or the matching torch.dtype)"
    )


def _split_source(path: str | Path) -> tuple[Path, str | None]:
    """Return ``(folder, gguf_file_name | None)`` for a model folder or ``.gguf`` file."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path, None
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.exists():
        raise ValueError(f"path: {path} is neither a model folder nor a .gguf file")
    raise FileNotFoundError(f"path: no model folder or .gguf file at {path}")


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = "float32",
    device: str = "cpu",
    random_weights: bool = False,
    pack_weights: bool = True,
) -> PreTrainedModel:
    """Load a causal LM from a local HF folder or ``.gguf`` file, ready for inference.

    Args:
        path: Folder with ``config.json`` + safetensors, or a ``.gguf`` file.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"`` or a torch.dtype.
        device: Torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        random_weights: Build the architecture from the folder's ``config.json`` alone, with freshly
            initialised weights, on ``device`` (no weight files needed). A forward's cost depends on
            the shapes alone, so this is for timing (``cast profile --random-weights``), never for output.
        pack_weights: In bfloat16 on a CPU, lay the decoder's linear weights out once for oneDNN
            (:mod:`cast_core.packing`: the same outputs, bit for bit, from faster forwards).

    Returns:
        The model in eval mode with ``requires_grad`` off and grouped ``sdpa`` attention
        (:mod:`cast_core.attention`).

    Raises:
        ValueError: unknown ``dtype`` or ``device``, or a path of the wrong kind.
        FileNotFoundError: nothing at ``path``.
    """
    torch_dtype = resolve_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: invalid value {device!r} ({err})") from None
    folder, gguf_file = _split_source(path)
    if random_weights:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        with torch_device:  # initialise where it runs: a GPU fills a 1.5B model in moments
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=GROUPED_SDPA)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch_dtype, attn_implementation=GROUPED_SDPA
        )
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    if pack_weights:
        pack_linears(model)
    return model


def load_drafter(
    path: str | Path,
    dtype: torch.dtype | str = "float32",
    device: str = "cpu",
    quantization: str = "auto",
    random_weights: bool = False,
) -> tuple[PreTrainedModel, str]:
    """:func:`load_model`, with int8 linear layers where ``quantization`` resolves to ``int8`` or ``mixed``
    (:func:`cast_core.quantize.resolve_quantization`: ``auto`` is ``int8`` on a CPU), and packed weights
    (:mod:`cast_core.packing`) only where it resolves to ``none``.

    Returns the model and the quantization applied (``none``, ``int8`` or ``mixed``), which names its cost profile
    (:func:`cast_core.quantize.drafter_profile_name`).

    Raises:
        ValueError: as :func:`load_model`, or naming ``drafter_quantization``.
    """
    applied = resolve_quantization(quantization, device)
    model = load_model(path, dtype, device, random_weights, pack_weights=applied == "none")
    if applied != "none":
        quantize_linears(model, MIXED_DENSE_ROWS if applied == "mixed" else None)
    return model, applied


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with a local HF folder or inside a ``.gguf`` file."""
    folder, gguf_file = _split_source(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def check_tokenizers_compatible(
    target_tok: PreTrainedTokenizerBase, drafter_tok: PreTrainedTokenizerBase
) -> None:
    """Raise ValueError unless the drafter's tokenizer equals the target's.

    Compared: the full ``get_vocab()`` mapping (token -> id, added tokens included)
    and the eos / bos / pad token ids. Model embedding sizes are not compared.
    """
    target_vocab, drafter_vocab = target_tok.get_vocab(), drafter_tok.get_vocab()
    if target_vocab != drafter_vocab:
        only_target = target_vocab.keys() - drafter_vocab.keys()
        only_drafter = drafter_vocab.keys() - target_vocab.keys()
        shared = target_vocab.keys() & drafter_vocab.keys()
        moved = sorted(t for t in shared if target_vocab[t] != drafter_vocab[t])
        example = (
            f"; e.g. {moved[0]!r}: target id {target_vocab[moved[0]]}, "
            f"drafter id {drafter_vocab[moved[0]]}"
            if moved
            else ""
        )
        raise ValueError(
            "drafter tokenizer does not match the target's (a drafter must share the "
            f"target's tokenizer): vocab sizes {len(target_vocab)} (target) vs "
            f"{len(drafter_vocab)} (drafter), {len(only_target)} tokens only in the target, "
            f"{len(only_drafter)} only in the drafter, {len(moved)} with different ids{example}"
        )
    for attr in _SPECIAL_IDS:
        target_id, drafter_id = getattr(target_tok, attr), getattr(drafter_tok, attr)
        if target_id != drafter_id:
            raise ValueError(
                f"drafter tokenizer does not match the target's: drafter {attr}={drafter_id}, "
                f"target {attr}={target_id}"
            )


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Return a model folder/file for an existing path or a known short name.

    An existing path is returned unchanged. A name from
    :data:`cast_core.fetch.KNOWN_MODELS` maps to ``<cache_dir>/<name>``, fetched
    and converted first if missing (cache dir: ``$CAST_CACHE_DIR`` or ``~/.cache/cast``).

    Raises:
        ValueError: neither an existing path nor a known name (lists the known names).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path not in KNOWN_MODELS:
        raise ValueError(
            f"model: {name_or_path!r} is neither an existing path nor a known model name; "
            f"known names: {', '.join(sorted(KNOWN_MODELS))}"
        )
    return fetch_model(name_or_path, cache_dir)
