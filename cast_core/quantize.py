"""Int8 weights for the drafter's linear layers (CPU).

A drafter's tokens are only proposals: the verifier decides every committed
token and acceptance treats drafts as deterministic (:mod:`cast_core.acceptance`),
so a drafter computed less exactly changes which trees are drafted, never the
output, greedy or sampled. What it changes is the price of a draft: on the
2-core AMD EPYC (avx512_bf16, 2 threads) a one-token forward of Qwen2.5-0.5B
over a 512-token cache took 60 ms in bfloat16 and 31 ms with int8 linears; 8
rows x 8 tokens, 243 ms and 145 ms (the cost profiles, median of 5). The
bfloat16 matrix-vector products there stream the decoder's 716 MB of weights at
about 15 GB/s where the memory reads 65 GB/s; the int8 kernel reads half the
bytes and runs the dot products in int8.

Each ``torch.nn.Linear`` of the model but its output head (which
:mod:`cast_core.vocab` slices by token id) becomes an :class:`Int8Linear`:

    W_q[o, :] = round(W[o, :] / s_o),   s_o = max_i |W[o, i]| / 127   (per output channel)
    y = dequant(quant(x) @ W_q^T) + b

with ``x`` quantised per call over its own range (dynamic quantisation, the
``fbgemm`` / ``x86`` kernels of ``torch.ops.quantized``). The rest of the model
(embeddings, norms, attention, the output head) keeps its dtype. Siblings that
read the same input (``q/k/v_proj``, ``gate/up_proj``) run as one matmul of
their stacked weights (:class:`SharedInputInt8`), with the same result.

``mixed`` keeps each layer's own weights beside the int8 ones and runs inputs of
``MIXED_DENSE_ROWS`` (64) tokens or more through them: where the CPU multiplies
bf16 matrices in hardware (AMX), a wide input is cheaper dense than through the
int8 kernel. On the 2-core Intel Xeon with AMX (Qwen2.5-0.5B over a 256-token
cache, in target steps of the 1.5B model at the same batch; median of 3-5), int8
against bf16: B=8 x 1 token 0.28 / 0.39, x 4 0.40 / 0.45, x 8 0.56 / 0.57, x 16
0.83-0.89 / 0.71, x 32 1.45 / 1.04, x 64 2.84 / 1.57, x 150 8.14 / 5.54; B=1 x 16
0.31 / 0.41, x 64 0.55 / 0.57, x 256 1.63 / 1.07. On the AMD EPYC (no AMX) 8 x 8
tokens ran 145 ms int8 against 243 ms bf16, so ``mixed`` is for machines whose
profile says so: ``auto`` picks it only where its cost profile was measured.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch

Quantization = Literal["auto", "none", "int8", "mixed"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int8", "mixed")
#: inputs of at least this many tokens run a ``mixed`` drafter's dense weights (module docstring)
MIXED_DENSE_ROWS = 64
#: ``auto``'s preference among the quantizations whose cost profile was measured
_AUTO_ORDER: tuple[str, ...] = ("mixed", "int8", "none")
_KERNELS = ("x86", "fbgemm")


@functools.cache
def int8_supported() -> bool:
    """Whether this torch build runs :class:`Int8Linear` (x86 / fbgemm kernels; tried once on a 2 x 2 layer)."""
    if not any(engine in torch.backends.quantized.supported_engines for engine in _KERNELS):
        return False
    try:
        Int8Linear(torch.nn.Linear(2, 2))(torch.ones(1, 2))
    except (RuntimeError, AttributeError, NotImplementedError):  # kernels missing or removed from this build
        return False
    return True


def resolve_quantization(
    setting: str, device: str, measured: Callable[[str], bool] | None = None
) -> Literal["none", "int8", "mixed"]:
    """The drafter quantization to use on ``device`` (a torch device or a profile's device kind).

    ``auto``: ``none`` off the CPU or without the int8 kernels; else the first of ``mixed``, ``int8``,
    ``none`` for which ``measured(q)`` (is a cost profile measured for the drafter quantized ``q``?)
    finds a profile -- a measured profile prices trees, a synthetic one guesses -- and ``int8`` where
    none is (or ``measured`` is not given).

    Raises:
        ValueError: naming ``drafter_quantization``, for an unknown setting, or ``int8`` / ``mixed``
            off the CPU or without the kernels.
    """
    if setting not in QUANTIZATIONS:
        raise ValueError(f"drafter_quantization: must be one of {', '.join(QUANTIZATIONS)}; got {setting!r}")
    on_cpu = str(device).startswith("cpu")
    if setting == "auto":
        if not (on_cpu and int8_supported()):
            return "none"
        if measured is None:
            return "int8"
        return next((q for q in _AUTO_ORDER if measured(q)), "int8")  # type: ignore[return-value]
    if setting in ("int8", "mixed") and not (on_cpu and int8_supported()):
        raise ValueError(f"drafter_quantization: {setting} runs on a CPU with x86/fbgemm kernels only; device is {device!r}")
    return setting  # type: ignore[return-value]


def drafter_profile_name(drafter: str, quantization: str) -> str:
    """The drafter's name in a cost profile: ``<name>+int8`` / ``<name>+mixed`` for a quantized drafter, whose forwards cost less."""
    return drafter if quantization == "none" else f"{drafter}+{quantization}"


def add_quantization_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--drafter-quantization {auto,none,int8,mixed}``, as the CLI commands that load a drafter take it
    (``default`` None: unset unless given, for a config file's value to stand)."""
    parser.add_argument(
        "--drafter-quantization",
        default=default,
        choices=QUANTIZATIONS,
        help="the drafter's linear layers: int8 (CPU only; cheaper drafts, the same output), mixed (int8, "
        f"but inputs of {MIXED_DENSE_ROWS}+ tokens through the layers' own weights: for CPUs with bf16 matrix "
        "units), none, or auto (default): on a CPU, when decoding, the first of mixed, int8, none whose cost "
        "profile was measured there, int8 where none was; a quantized drafter's cost profile is named "
        "<drafter>+int8 / <drafter>+mixed",
    )


def _prepack(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """``weight`` ``[out, in]`` quantised per output channel (``s_o = max_i |W[o, i]| / 127``), packed for the int8 kernel."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; int8_supported() checks they still run
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch.quantize_per_channel(weight, scales, zeros, axis=0, dtype=torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())


def _int8_matmul(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """``x @ W^T + b`` by the int8 kernel, ``x`` quantised over its own range, returned in ``x``'s dtype."""
    return torch.ops.quantized.linear_dynamic(x.float(), packed, True).to(x.dtype)


class SharedInputInt8(torch.nn.Module):
    """Sibling linears that read the same input (``q/k/v_proj``, ``gate/up_proj``) as one int8 matmul.

    ``W = [W_1; W_2; ...]`` (rows stacked, biases concatenated, zeros for a member without one) is
    quantised per output channel as each member's own would be, and the input once per call over its
    range, so each member's slice of ``x @ W^T + b`` is exactly what its own :class:`Int8Linear`
    returns. One call instead of several saves the kernel's per-call cost (quantising ``x``,
    dispatch, dtype casts): on the 2-core Intel Xeon with AMX (Qwen2.5-0.5B shapes, 8 rows), q+k+v
    209 us separately and 98 us fused, gate+up 535 and 448 us, one decoder layer's linears 1102 and 903 us.

    The first member called with an input computes every member's output; the others are handed
    theirs when called with that same tensor (held until each has taken its slice, or the next input).
    A model therefore runs one forward at a time, as the engine's models do.
    """

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight.detach().float() for linear in linears])
        biases = [
            torch.zeros(linear.out_features) if linear.bias is None else linear.bias.detach().float() for linear in linears
        ]
        has_bias = any(linear.bias is not None for linear in linears)
        self._packed = _prepack(weight, torch.cat(biases) if has_bias else None)
        self._pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for ``x``: its slice of the fused matmul, computed once per input."""
        if self._pending is not None and self._pending[0] is x and index in self._pending[1]:
            parts = self._pending[1]
            out = parts.pop(index)
            if not parts:
                self._pending = None
            return out
        outputs = [part.contiguous() for part in _int8_matmul(x, self._packed).split(self.sizes, dim=-1)]
        others = {i: part for i, part in enumerate(outputs) if i != index}
        self._pending = (x, others) if others else None
        return outputs[index]


class Int8Linear(torch.nn.Module):
    """``torch.nn.Linear`` with per-channel int8 weights and dynamically quantised inputs (module docstring)."""

    def __init__(
        self,
        linear: torch.nn.Linear,
        dense_rows: int | None = None,
        shared: tuple[SharedInputInt8, int] | None = None,
    ) -> None:
        """``dense_rows``: inputs of at least this many rows (tokens) run the layer's own weights in their
        dtype instead (kept beside the int8 ones); None: every input runs the int8 kernel. ``shared``:
        ``(group, index)``, this layer is member ``index`` of ``group`` and its int8 weights live there."""
        super().__init__()
        self.dense_rows = dense_rows
        self.dense = None if dense_rows is None else linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shared = None if shared is None else shared[0]
        self._index = 0 if shared is None else shared[1]
        self._packed = None if shared is not None else _prepack(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` in the input's dtype: by the int8 kernel (its group's, if shared), or by the dense layer
        for ``dense_rows`` rows or more."""
        if self.dense is not None and x.numel() >= self.dense_rows * self.in_features:
            return self.dense(x)
        if self.shared is not None:
            return self.shared.output(x, self._index)
        return _int8_matmul(x, self._packed)

    def extra_repr(self) -> str:
        dense = "" if self.dense_rows is None else f", dense from {self.dense_rows} rows"
        shared = "" if self.shared is None else f", member {self._index} of a shared-input int8 matmul"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{dense}{shared}"


def quantization_of(model: torch.nn.Module) -> str:
    """How ``model``'s linear layers run: ``none``, ``int8`` or ``mixed`` (:class:`Int8Linear` with dense weights)."""
    layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    if not layers:
        return "none"
    return "mixed" if layers[0].dense is not None else "int8"


#: sibling layers (by attribute name) that read the same input in the decoder families this engine runs
#: (Llama, Qwen2/3, Mistral): one :class:`SharedInputInt8` each where a module has them all
SHARED_INPUT_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _shared_groups(module: torch.nn.Module, head: torch.nn.Module | None) -> dict[str, tuple[SharedInputInt8, int]]:
    """``{child name: (group, index)}`` for ``module``'s children that form a :data:`SHARED_INPUT_SIBLINGS` set
    (all plain ``torch.nn.Linear`` with one input width, none the output head)."""
    members: dict[str, tuple[SharedInputInt8, int]] = {}
    for names in SHARED_INPUT_SIBLINGS:
        linears = [getattr(module, name, None) for name in names]
        if not all(isinstance(linear, torch.nn.Linear) and linear is not head for linear in linears):
            continue
        if len({linear.in_features for linear in linears}) != 1:
            continue
        group = SharedInputInt8(linears)
        members.update({name: (group, i) for i, name in enumerate(names)})
    return members


def quantize_linears(model: torch.nn.Module, dense_rows: int | None = None) -> int:
    """Replace every ``torch.nn.Linear`` of ``model`` but its output head with :class:`Int8Linear`
    (``dense_rows``: as there); siblings that read the same input share one int8 matmul (:class:`SharedInputInt8`).

    Returns how many were replaced.

    Raises:
        ValueError: the model is not on the CPU, or this torch build has no int8 kernels.
    """
    if not int8_supported():
        raise ValueError("drafter_quantization: this torch build has no x86/fbgemm int8 kernels")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("drafter_quantization: int8 linears run on the CPU only")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for module in list(model.modules()):
        shared = _shared_groups(module, head)
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(module, name, Int8Linear(child, dense_rows, shared.get(name)))
                replaced += 1
    return replaced
