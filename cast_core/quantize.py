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
(embeddings, norms, attention, the output head) keeps its dtype.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable
from typing import Literal

import torch

Quantization = Literal["auto", "none", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "none", "int8")
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
) -> Literal["none", "int8"]:
    """The drafter quantization to use on ``device`` (a torch device or a profile's device kind).

    ``auto``: ``int8`` on a CPU whose torch build has the int8 kernels, else ``none`` -- and ``none``
    also where ``measured(q)`` (is a cost profile measured for the drafter quantized ``q``?) finds a
    profile for the plain drafter but none for the int8 one: a measured profile prices trees, a
    synthetic one guesses.

    Raises:
        ValueError: naming ``drafter_quantization``, for an unknown setting, or ``int8`` off the CPU
            or without the kernels.
    """
    if setting not in QUANTIZATIONS:
        raise ValueError(f"drafter_quantization: must be one of {', '.join(QUANTIZATIONS)}; got {setting!r}")
    on_cpu = str(device).startswith("cpu")
    if setting == "auto":
        if not (on_cpu and int8_supported()):
            return "none"
        if measured is not None and not measured("int8") and measured("none"):
            return "none"
        return "int8"
    if setting == "int8" and not (on_cpu and int8_supported()):
        raise ValueError(f"drafter_quantization: int8 runs on a CPU with x86/fbgemm kernels only; device is {device!r}")
    return setting  # type: ignore[return-value]


def drafter_profile_name(drafter: str, quantization: str) -> str:
    """The drafter's name in a cost profile: ``<name>+int8`` for an int8 drafter, whose forwards cost less."""
    return drafter if quantization == "none" else f"{drafter}+{quantization}"


def add_quantization_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--drafter-quantization {auto,none,int8}``, as the CLI commands that load a drafter take it
    (``default`` None: unset unless given, for a config file's value to stand)."""
    parser.add_argument(
        "--drafter-quantization",
        default=default,
        choices=QUANTIZATIONS,
        help="the drafter's linear layers: int8 (CPU only; cheaper drafts, the same output), none, or auto "
        "(default): int8 on a CPU, except, when decoding, where only the plain drafter's cost profile was "
        "measured; an int8 drafter's cost profile is named <drafter>+int8",
    )


class Int8Linear(torch.nn.Module):
    """``torch.nn.Linear`` with per-channel int8 weights and dynamically quantised inputs (module docstring)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zeros = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; int8_supported() checks they still run
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scales, zeros, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` in the input's dtype (computed by the int8 kernel)."""
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs :class:`Int8Linear` layers."""
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantize_linears(model: torch.nn.Module) -> int:
    """Replace every ``torch.nn.Linear`` of ``model`` but its output head with :class:`Int8Linear`.

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
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced
