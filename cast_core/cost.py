"""Measured inference-cost tables: the ``f(B, ctx, n)`` that CAST's policy prices trees with.

A :class:`CostProfile` holds one :class:`CostTable` per model role (``target``,
``drafter``) measured on one device kind in one dtype. A table stores
``seconds[b][c][k]`` = wall time of one forward of ``token_counts[k]`` new tokens
per sequence, batch ``batch_sizes[b]``, on top of a KV cache of
``context_buckets[c]`` tokens (see :mod:`cast_core.profiler` for how it is measured).

Lookup ``f(B, ctx, n)`` (:meth:`CostProfile.latency`) is separable piecewise-linear
interpolation on the three axes:

* **tokens n** -- linear between measured counts; below the first count the first
  value (a forward never costs less than the smallest measured one); beyond the
  last count linear extrapolation with the slope over the upper half of the
  counts (from the first count at least half the last one to the last one);
  ``n <= 0`` costs 0. One segment's slope is too noisy to carry a prompt-length
  forward: on the 2-core AMD EPYC the int8 drafter's B=8 row reads 0.49, 0.86
  and 0.93 s at 32, 48 and 64 tokens, and the last segment's 3.9 ms a token
  priced a feed of 8 x 186 tokens at 1.4 s where it took 3.8 s (the upper
  half's 13.6 ms: 2.6 s).
* **context ctx** -- clamped to ``[context_buckets[0], context_buckets[-1]]``,
  linear between buckets.
* **batch B** -- linear between measured sizes; below the first size the first
  value; beyond the last size ``f(B_L) + (B - B_L) * s`` with the last segment's
  slope ``s = (f(B_L) - f(B_{L-1})) / (B_L - B_{L-1})`` clipped at 0 (never below
  the last value).

Raw timings are not monotone in n: on a CPU a one-token forward at batch 1 runs
a matrix-vector kernel that can be slower than two tokens' matrix-matrix one,
and GEMM tiles make 24 tokens slower than 32 on some machines. A forward of n
tokens can always be padded with tokens nobody reads up to a measured count
``m > n`` (:meth:`CostTable.padded_tokens`; the verifier does it), so the cost
the policy prices is the padded one::

    f(B, ctx, n) = min( raw(B, ctx, n), min_{m in token_counts, m > n} raw(B, ctx, m) )

where ``raw`` is the interpolation above of the stored (raw) ``seconds``. ``f`` is
non-decreasing in n: below the last count it is a suffix minimum, beyond it the
padded row continues with a slope >= 0.

Profiles are JSON files named by :func:`profile_slug` and found by
:func:`find_profile` in ``$CAST_CACHE_DIR/profiles`` (default
``~/.cache/cast/profiles``, measured locally, searched first) and the packaged
``cast_core/profiles/``. :func:`resolve_profile` falls back, with a warning, to
:meth:`CostProfile.synthetic`'s affine model when none matches.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from cast_core.attention import GROUPED_SDPA
from cast_core.fetch import default_cache_dir
from cast_core.models import AUTO_DTYPE
from cast_core.packing import packing_supported
from cast_core.quantize import drafter_profile_name, resolve_quantization

logger = logging.getLogger(__name__)

Role = Literal["target", "drafter"]

#: Profiles shipped with the package (committed measurements).
PACKAGED_PROFILES_DIR: Path = Path(__file__).with_name("profiles")

#: Fallback affine costs (seconds) used by :func:`resolve_profile` when no measured
#: profile matches: Qwen2.5-1.5B bf16 on 2 CPU threads measured 134 ms for one decode
#: step and ~+3.2 ms per extra token (DESIGN.md); the 0.5B drafter is taken as 1/3 of it.
#: Only the drafter/target ratio and the slope/base ratio matter to the policy, which
#: normalises every cost by one target decode step.
FALLBACK_TARGET_BASE_S = 0.134
FALLBACK_TARGET_PER_TOKEN_S = 0.0032
FALLBACK_DRAFTER_BASE_S = 0.045
FALLBACK_DRAFTER_PER_TOKEN_S = 0.0011


def device_name(device: str | torch.device) -> str:
    """Stable name of a device kind, the key profiles are stored under.

    CUDA: ``torch.cuda.get_device_name(i)`` (e.g. ``"NVIDIA H100 80GB HBM3"``).
    CPU: ``"cpu-<N>core-<model name from /proc/cpuinfo>-<ISA level>"`` with ``N =
    torch.get_num_threads()`` (the threads a forward actually uses) and the ISA level of
    :func:`cpu_isa`: virtual machines report a bare ``AMD EPYC`` for parts with and without
    AVX-512 bf16, whose bf16 forwards differ about twice in speed, so one must not read
    the other's profile. Other device types: the type name (``"mps"``).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if dev.type == "cpu":
        model, flags = cpu_info()
        return f"cpu-{torch.get_num_threads()}core-{model}-{cpu_isa(flags)}"
    return dev.type


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU flags that decide how fast bf16 and fp32 matmuls run (recorded with benchmark results)."""


def cpu_info() -> tuple[str, list[str]]:
    """The first ``model name`` in /proc/cpuinfo (``"unknown"`` where there is none) and which of :data:`CPU_FLAGS` it has."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def cpu_isa(flags: Sequence[str]) -> str:
    """The widest matmul instruction set among ``flags``: ``amx``, ``avx512bf16``, ``avx512``, ``avx2`` or ``base``."""
    for flag, level in (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return level
    return "base"


def native_dtype(device_kind: str) -> str:
    """The dtype ``"auto"`` stands for on a device kind (``device_name``): ``bfloat16`` on accelerators and on
    CPUs with bf16 matrix units (ISA ``amx`` or ``avx512bf16``, ``cpu_isa``), ``float32`` on other CPUs.

    Those emulate bf16 matmuls: on a 2-core Intel Xeon with AVX-512 but neither AVX-512 bf16 nor AMX, the 1.5B
    target's one-token forward at B=16 took 2.29 s in bf16 against 0.82 s in fp32, at B=1 333 against 366 ms
    (``bench/results/xeon_avx512_fp32/bf16_vs_fp32.log``).
    A GPU without bf16 (before NVIDIA Ampere) needs an explicit ``float16``.
    """
    if device_kind.startswith("cpu-"):
        return "bfloat16" if device_kind.rsplit("-", 1)[-1] in ("amx", "avx512bf16") else "float32"
    return "bfloat16"


def resolve_dtype_name(dtype: str, device_kind: str) -> str:
    """``dtype`` as given, or ``native_dtype(device_kind)`` for ``"auto"``."""
    return native_dtype(device_kind) if dtype == AUTO_DTYPE else dtype


def usable_device_name(device: str | torch.device) -> str:
    """``device_name(device)``; a malformed device, or one this process has none of (CUDA without a GPU), raises
    ``ValueError`` naming the ``device`` field."""
    try:
        return device_name(device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device: {str(device)!r} is not usable here ({err})") from None


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name: ``torch.bfloat16`` and ``"torch.bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _slugify(text: str) -> str:
    """Lower-case ``text`` and collapse every run of non-alphanumerics into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _model_key(name_or_path: str) -> str:
    """Last path component of a model name or path (``Qwen/Qwen2.5-1.5B`` -> ``Qwen2.5-1.5B``)."""
    return name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def profile_slug(device: str, target: str, drafter: str, dtype: str | torch.dtype) -> str:
    """File stem of a profile: ``slug(device)__slug(target)__slug(drafter)__dtype``.

    Model names are reduced to their last path component, so a hub id and a local
    directory of the same model (``Qwen/Qwen2.5-1.5B-Instruct``,
    ``/models/Qwen2.5-1.5B-Instruct``) share a profile. Example:
    ``nvidia-h100-80gb-hbm3__qwen2-5-1-5b-instruct__qwen2-5-0-5b-instruct__bfloat16``.
    """
    parts = (device, _model_key(target), _model_key(drafter), dtype_name(dtype))
    return "__".join(_slugify(p) for p in parts)


def user_profiles_dir() -> Path:
    """``<cache dir>/profiles``: ``$CAST_CACHE_DIR/profiles``, default ``~/.cache/cast/profiles``."""
    return default_cache_dir() / "profiles"


def default_search_dirs() -> list[Path]:
    """Where :func:`find_profile` looks: the user cache first (local measurements win), then the package."""
    return [user_profiles_dir(), PACKAGED_PROFILES_DIR]


class _Grid:
    """Precomputed lookup array of one :class:`CostTable`.

    ``array[b]`` for ``b < len(batch)`` is the raw table; ``array[len(batch)]`` is the
    batch-extrapolation slope ``s[c][k]`` (seconds per extra sequence, >= 0), so every
    batch lookup is a two-term combination ``wa * array[ia] + wb * array[ib]``.
    """

    __slots__ = ("batch", "context", "tokens", "array", "_last_b", "_tokens_array")

    def __init__(self, batch: list[int], context: list[int], tokens: list[int], seconds: np.ndarray) -> None:
        if len(batch) > 1:
            slope = np.maximum((seconds[-1] - seconds[-2]) / (batch[-1] - batch[-2]), 0.0)  # [ctx, n]
        else:
            slope = np.zeros_like(seconds[0])
        self.batch = batch
        self.context = context
        self.tokens = tokens
        self.array = np.concatenate([seconds, slope[None]], axis=0)  # [batch + 1, ctx, n]
        self._last_b = len(batch) - 1
        self._tokens_array = np.asarray(tokens, dtype=np.float64)

    def __eq__(self, other: object) -> bool:
        """Grids are derived data: equal when built from equal tables (keeps pydantic model equality by value)."""
        if not isinstance(other, _Grid):
            return NotImplemented
        mine = (self.batch, self.context, self.tokens)
        return mine == (other.batch, other.context, other.tokens) and np.array_equal(self.array, other.array)

    def batch_weights(self, b: float) -> tuple[int, float, int, float]:
        """``(ia, wa, ib, wb)`` with ``f(b) = wa * array[ia] + wb * array[ib]``."""
        xs = self.batch
        last = self._last_b
        if b <= xs[0]:
            return 0, 1.0, 0, 0.0
        if b >= xs[last]:
            return last, 1.0, last + 1, float(b - xs[last])
        i = bisect.bisect_right(xs, b) - 1
        w = (b - xs[i]) / (xs[i + 1] - xs[i])
        return i, 1.0 - w, i + 1, w

    def context_weights(self, c: float) -> tuple[int, int, float]:
        """``(j0, j1, w)`` with ``f(c) = (1 - w) * f[j0] + w * f[j1]``, ``c`` clamped to the buckets."""
        xs = self.context
        if c <= xs[0]:
            return 0, 0, 0.0
        if c >= xs[-1]:
            last = len(xs) - 1
            return last, last, 0.0
        j = bisect.bisect_right(xs, c) - 1
        return j, j + 1, (c - xs[j]) / (xs[j + 1] - xs[j])

    def raw_row(self, batch: float, context: float) -> np.ndarray:
        """``[raw(batch, context, m) for m in tokens]``: the measured counts' row, interpolated in B and ctx."""
        ia, wa, ib, wb = self.batch_weights(batch)
        j0, j1, wc = self.context_weights(context)
        a = self.array
        return (1.0 - wc) * (wa * a[ia, j0] + wb * a[ib, j0]) + wc * (wa * a[ia, j1] + wb * a[ib, j1])

    def _raw(self, row: np.ndarray, n: np.ndarray) -> np.ndarray:
        """``raw`` at token counts ``n``: linear in ``row`` between counts, the first value below them,
        beyond them the slope from the first count at least half the last one to the last one."""
        curve = np.interp(n, self._tokens_array, row)
        if len(self.tokens) > 1:
            beyond = n > self.tokens[-1]
            half = min(bisect.bisect_left(self.tokens, self.tokens[-1] / 2), len(self.tokens) - 2)
            slope = (row[-1] - row[half]) / (self.tokens[-1] - self.tokens[half])
            curve[beyond] = row[-1] + max(slope, 0.0) * (n[beyond] - self.tokens[-1])
        return curve

    def _cheapest(self, batch: float, context: float, tokens: float) -> tuple[float, float]:
        """``(m, raw(m))`` for the ``m`` in ``{tokens} U {m in token_counts : m > tokens}`` with the least
        raw cost, the smallest one on ties: the padded count and ``f(batch, context, tokens)``."""
        row = self.raw_row(batch, context)
        best = (float(tokens), float(self._raw(row, np.array([float(tokens)]))[0]))
        larger = self._tokens_array > tokens
        if larger.any():
            k = int(np.argmin(row[larger]))
            if row[larger][k] < best[1]:
                best = (float(self._tokens_array[larger][k]), float(row[larger][k]))
        return best

    def padded_tokens(self, batch: float, context: float, tokens: int) -> int:
        """What a forward of ``tokens`` new tokens is padded to (:meth:`_cheapest`)."""
        return int(self._cheapest(batch, context, tokens)[0])

    def latency(self, batch: float, context: float, tokens: float) -> float:
        """``f(batch, context, tokens)`` in seconds, padding included (module docstring); 0.0 for ``tokens <= 0``."""
        return self._cheapest(batch, context, tokens)[1] if tokens > 0 else 0.0

    def latency_curve(self, batch: float, context: float, max_tokens: int) -> np.ndarray:
        """``[f(batch, context, n) for n in 0..max_tokens]`` (``f(., ., 0) = 0``), same formula as :meth:`latency`:
        the raw curve up to the last measured count, suffix-minimised, then continued past it."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        row = self.raw_row(batch, context)
        span = max(max_tokens, self.tokens[-1])
        curve = self._raw(row, np.arange(span + 1, dtype=np.float64))
        last = self.tokens[-1]
        curve[: last + 1] = np.minimum.accumulate(curve[: last + 1][::-1])[::-1]
        curve[0] = 0.0
        return curve[: max_tokens + 1]


def _check_axis(values: list[int], name: str) -> list[int]:
    """Require a non-empty, strictly increasing list of positive integers."""
    if not values:
        raise ValueError(f"{name} must not be empty")
    if values[0] < 1:
        raise ValueError(f"{name} must be positive, got {values}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name} must be strictly increasing, got {values}")
    return values


class CostTable(BaseModel):
    """Measured forward latency of one model role: ``seconds[b][c][k]`` for
    ``(batch_sizes[b], context_buckets[c], token_counts[k])``, raw; lookups price padding (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="Model name or path the table was measured with (e.g. 'qwen2.5-coder-1.5b-instruct')."
    )
    batch_sizes: list[int] = Field(
        description="Measured batch sizes B (sequences per forward), strictly increasing, >= 1."
    )
    context_buckets: list[int] = Field(
        description="Measured KV-cache lengths ctx (tokens already cached per sequence), strictly increasing, >= 1."
    )
    token_counts: list[int] = Field(
        description="Measured new-token counts n per sequence in one forward, strictly increasing, >= 1."
    )
    seconds: list[list[list[float]]] = Field(
        description="Forward wall time in seconds indexed [batch][context][tokens]; finite and > 0. "
        "Stored raw (not necessarily monotone in n); lookups take the cheapest padded count."
    )

    _grid: _Grid = PrivateAttr()

    @field_validator("batch_sizes")
    @classmethod
    def _check_batch_sizes(cls, v: list[int]) -> list[int]:
        return _check_axis(v, "batch_sizes")

    @field_validator("context_buckets")
    @classmethod
    def _check_context_buckets(cls, v: list[int]) -> list[int]:
        return _check_axis(v, "context_buckets")

    @field_validator("token_counts")
    @classmethod
    def _check_token_counts(cls, v: list[int]) -> list[int]:
        return _check_axis(v, "token_counts")

    @field_validator("seconds")
    @classmethod
    def _finite_positive(cls, v: list[list[list[float]]]) -> list[list[list[float]]]:
        """Check every value is finite and > 0 (the raw timings are kept; padding is applied at lookup)."""
        for plane in v:
            for row in plane:
                if not all(math.isfinite(x) and x > 0 for x in row):
                    raise ValueError(f"seconds must be finite and > 0, got {row}")
        return v

    @model_validator(mode="after")
    def _check_shape_and_index(self) -> CostTable:
        """Check ``seconds`` is ``[batch][context][tokens]``, then precompute the lookup arrays (:class:`_Grid`)."""
        shape = (len(self.batch_sizes), len(self.context_buckets), len(self.token_counts))
        if len(self.seconds) != shape[0] or any(
            len(plane) != shape[1] or any(len(row) != shape[2] for row in plane) for plane in self.seconds
        ):
            raise ValueError(f"seconds must have shape [batch][context][tokens] = {list(shape)}")
        self._grid = _Grid(
            self.batch_sizes, self.context_buckets, self.token_counts, np.asarray(self.seconds, dtype=np.float64)
        )
        return self

    def latency(self, batch: int, context: int, tokens: int) -> float:
        """Seconds for a forward of ``tokens`` new tokens per sequence (formula: module docstring)."""
        return self._grid.latency(batch, context, tokens)

    def latency_curve(self, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """Array of length ``max_tokens + 1``: index n = :meth:`latency` for n tokens, index 0 = 0.0."""
        return self._grid.latency_curve(batch, context, max_tokens)

    def padded_tokens(self, batch: int, context: int, tokens: int) -> int:
        """Token count a forward of ``tokens`` new tokens per sequence should run at: the one of
        ``{tokens} U {m in token_counts : m > tokens}`` with the least raw cost (fewest on ties)."""
        return self._grid.padded_tokens(batch, context, tokens)


class CostProfile(BaseModel):
    """Cost tables of a target/drafter pair on one device kind in one dtype (one JSON file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(default=1, description="Version of this JSON layout.")
    device: str = Field(description="Device kind as given by device_name() (e.g. 'NVIDIA H100 80GB HBM3').")
    dtype: str = Field(description="Parameter/activation dtype both models ran in (e.g. 'bfloat16').")
    target: CostTable = Field(description="Cost table of the target (verifier) model.")
    drafter: CostTable = Field(description="Cost table of the drafter model.")
    measured_at: str = Field(description="When the profile was measured, ISO 8601 UTC.")
    torch_threads: int = Field(ge=1, description="torch.get_num_threads() during the measurement.")
    notes: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form provenance: library versions, repeats, attention implementation, 'synthetic', ...",
    )

    _grids: dict[str, _Grid] = PrivateAttr()

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, v: str) -> str:
        return dtype_name(v)

    def model_post_init(self, context: Any, /) -> None:
        """Index the role grids for :meth:`latency`."""
        self._grids = {"target": self.target._grid, "drafter": self.drafter._grid}

    @property
    def slug(self) -> str:
        """File stem this profile is stored under (:func:`profile_slug`)."""
        return profile_slug(self.device, self.target.model, self.drafter.model, self.dtype)

    @property
    def measured(self) -> bool:
        """False for a synthetic profile (its seconds describe no machine)."""
        return not self.notes.get("synthetic", False)

    def plain_step_seconds(self, seconds: float) -> float:
        """``seconds`` (a plain target step read from this profile) if measured, else 0 (unknown)."""
        return float(seconds) if self.measured else 0.0

    def latency(self, role: Role, batch: int, context: int, tokens: int) -> float:
        """``f_role(batch, context, tokens)`` in seconds: one forward of ``tokens`` new tokens per
        sequence for ``batch`` sequences over a ``context``-token KV cache.

        Piecewise-linear in each axis; context clamped to the measured buckets; batch and
        tokens extrapolated linearly past the grid, never below the last measured value;
        ``tokens <= 0`` -> 0.0. Full rules in the module docstring.
        """
        return self._grids[role].latency(batch, context, tokens)

    def latency_curve(self, role: Role, batch: int, context: int, max_tokens: int) -> np.ndarray:
        """``curve[n] = latency(role, batch, context, n)`` for ``n = 0..max_tokens`` (``curve[0] = 0.0``),
        float64 array of length ``max_tokens + 1``."""
        return self._grids[role].latency_curve(batch, context, max_tokens)

    def save(self, path: str | Path) -> Path:
        """Write the profile as indented JSON (atomically: temp file + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        """Read and validate a profile JSON file."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def synthetic(
        cls,
        target_base_s: float,
        target_per_token_s: float,
        drafter_base_s: float,
        drafter_per_token_s: float,
        *,
        batch_sizes: Sequence[int] = (1, 2, 4, 8),
        context_buckets: Sequence[int] = (128, 512, 1024),
        token_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        device: str = "synthetic",
        dtype: str | torch.dtype = "float32",
        target: str = "synthetic-target",
        drafter: str = "synthetic-drafter",
    ) -> CostProfile:
        """Affine cost model tabulated on a grid: ``f(B, ctx, n) = base + per_token * B * n``.

        Independent of ctx. Because ``f`` is affine in n for fixed B and in B for fixed n,
        :meth:`latency` reproduces it exactly for every ``B >= batch_sizes[0]`` and
        ``n >= token_counts[0]`` (interpolation and extrapolation are both exact).
        With ``base = 0`` this is the linear cost of the paper's Theorem 4.1. Used in
        tests and, logged as a warning, when no measured profile matches.
        """

        def table(model: str, base: float, per_token: float) -> CostTable:
            seconds = [
                [[base + per_token * b * n for n in token_counts] for _ in context_buckets] for b in batch_sizes
            ]
            return CostTable(
                model=model,
                batch_sizes=list(batch_sizes),
                context_buckets=list(context_buckets),
                token_counts=list(token_counts),
                seconds=seconds,
            )

        return cls(
            device=device,
            dtype=dtype_name(dtype),
            target=table(target, target_base_s, target_per_token_s),
            drafter=table(drafter, drafter_base_s, drafter_per_token_s),
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            torch_threads=torch.get_num_threads(),
            notes={
                "synthetic": True,
                "formula": "f(B, ctx, n) = base + per_token * B * n",
                "target": {"base_s": target_base_s, "per_token_s": target_per_token_s},
                "drafter": {"base_s": drafter_base_s, "per_token_s": drafter_per_token_s},
            },
        )


def find_profile(
    device: str,
    target: str,
    drafter: str,
    dtype: str | torch.dtype,
    search_dirs: Sequence[Path] | None = None,
) -> CostProfile | None:
    """Load ``<dir>/<profile_slug(device, target, drafter, dtype)>.json`` from the first of
    ``search_dirs`` (default :func:`default_search_dirs`) that has it; ``None`` if none does.

    Warns where the profile was timed with another attention than the engine's (``notes.attn_implementation``).
    """
    name = profile_slug(device, target, drafter, dtype) + ".json"
    for directory in default_search_dirs() if search_dirs is None else search_dirs:
        path = Path(directory) / name
        if path.is_file():
            logger.info("cost profile for %s / %s / %s / %s: %s", device, target, drafter, dtype_name(dtype), path)
            profile = CostProfile.load(path)
            attention = profile.notes.get("attn_implementation", GROUPED_SDPA)
            if attention != GROUPED_SDPA:
                logger.warning(
                    "cost profile %s was measured with %r attention, the engine runs %r: multi-token forwards "
                    "(trees) may be priced high; re-measure it with `cast profile`",
                    path,
                    attention,
                    GROUPED_SDPA,
                )
            _warn_on_packing(profile, path)
            return profile
    return None


def _warn_on_packing(profile: CostProfile, path: Path) -> None:
    """Warn where ``profile`` was timed with the target's weights packed (``notes.weight_packing``,
    :mod:`cast_core.packing`) and the engine's are not, or the other way round: a plain step then costs
    another share of a drafted one than the profile says."""
    if profile.dtype != "bfloat16" or not profile.device.startswith("cpu"):
        return
    measured, engine = bool(profile.notes.get("weight_packing", {}).get("target", False)), packing_supported()
    if measured != engine:
        logger.warning(
            "cost profile %s was measured with the target's weights %s, the engine runs them %s: steps may be "
            "priced off by 10-40 %%; re-measure it with `cast profile`",
            path,
            "packed" if measured else "unpacked",
            "packed" if engine else "unpacked",
        )


def resolve_drafter_quantization(setting: str, device: str, target: str, drafter: str, dtype: str | torch.dtype) -> str:
    """:func:`cast_core.quantize.resolve_quantization` on ``device`` (a device kind, :func:`device_name`),
    told which of the drafter's profiles (plain, ``+int8``) :func:`find_profile` finds."""

    def measured(quantization: str) -> bool:
        return find_profile(device, target, drafter_profile_name(drafter, quantization), dtype) is not None

    return resolve_quantization(setting, device, measured)


def resolve_profile(
    device: str,
    target: str,
    drafter: str,
    dtype: str | torch.dtype,
    search_dirs: Sequence[Path] | None = None,
) -> CostProfile:
    """:func:`find_profile`, or -- with a WARNING naming the missing file and the fix -- the
    synthetic affine profile built from the ``FALLBACK_*`` constants."""
    profile = find_profile(device, target, drafter, dtype, search_dirs)
    if profile is not None:
        return profile
    drafter_model, _, quantization = drafter.partition("+")  # an int8 drafter's profile is named <drafter>+int8
    logger.warning(
        "no measured cost profile %s.json for device %r, target %r, drafter %r, dtype %s; "
        "falling back to a SYNTHETIC affine cost model f = base + per_token * B * n "
        "(run `cast profile --target %s --drafter %s --dtype %s%s` to measure one)",
        profile_slug(device, target, drafter, dtype),
        device,
        target,
        drafter,
        dtype_name(dtype),
        target,
        drafter_model,
        dtype_name(dtype),
        f" --drafter-quantization {quantization}" if quantization else "",
    )
    return CostProfile.synthetic(
        FALLBACK_TARGET_BASE_S,
        FALLBACK_TARGET_PER_TOKEN_S,
        FALLBACK_DRAFTER_BASE_S,
        FALLBACK_DRAFTER_PER_TOKEN_S,
        device=device,
        dtype=dtype,
        target=target,
        drafter=drafter,
    )
