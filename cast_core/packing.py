"""bfloat16 linear layers with their weights laid out once for oneDNN (CPU).

On a CPU, ``torch.nn.functional.linear`` in bfloat16 runs oneDNN's matmul, which
first reorders the weight matrix into the kernel's blocked layout -- on every
call. A decode step's products are small (``M`` = batch x new tokens rows), so
that pass over the whole matrix costs about as much as the product itself. On
the 2-core AMD EPYC (AVX-512 bf16, 2 threads) one ``[M, 1536] x [1536, 8960]``
product (Qwen2.5-1.5B's MLP) took 1.0-1.3 ms at M = 1 and 1.3-1.9 ms at M = 8
through ``linear``, 0.25-0.55 ms and 0.6-1.3 ms on a weight reordered once
(``torch.ops.mkldnn._reorder_linear_weight``, run by the same kernel through
``torch.ops.mkldnn._linear_pointwise``); at M = 512 (a prompt) 34 ms against
32 ms. The 1.5B target's plain step at B = 8 (context 128, the cost profiles)
went from 0.232 to 0.156 s, and vanilla decoding ran 1.40-1.57x faster at B = 1
and 8 (``bench/results/weight_packing/``).

The output is bitwise the one ``linear`` gives (the same kernel on the same
numbers, :func:`packing_supported` checks it once), so packing changes no
token, greedy or sampled. It is done for bfloat16 only: in float32 ``linear``
runs another library's kernel (MKL), and the packed oneDNN one, though about
3x faster there, rounds differently.

Every ``torch.nn.Linear`` inside the decoder (``model.model``) becomes a
:class:`PackedLinear`; the LM head stays as it is (its weight may be tied to the
embeddings, and the drafter's head reads it by token id, ``cast_core.vocab``).
A cost profile records whether its forwards ran packed (``notes.weight_packing``),
and ``cast_core.cost.find_profile`` warns where that differs from the engine's.
"""

from __future__ import annotations

import functools

import torch

#: The weight layout hint: oneDNN's blocked format for products of about this many rows (decode steps' size; the
#: kernel takes any ``M`` on it, and 1, 8 and 64 ran within noise of each other at M = 1..512).
PACKING_ROWS_HINT = 8


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` on a weight laid out by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@functools.cache
def packing_supported() -> bool:
    """Whether this torch build packs bfloat16 linear weights and multiplies on them exactly as ``linear`` does
    (tried once on a 16 x 32 layer; False where the ops are missing or differ)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 16, generator=generator).to(torch.bfloat16)
    bias = torch.randn(32, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, 3, 16, generator=generator).to(torch.bfloat16)
    try:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_ROWS_HINT)
            return torch.equal(_packed_product(x, packed, bias), torch.nn.functional.linear(x, weight, bias))
    except (RuntimeError, AttributeError, NotImplementedError):  # ops missing, or no bf16 kernel on this CPU
        return False


class PackedLinear(torch.nn.Module):
    """``torch.nn.Linear`` (bfloat16, CPU) whose weight is kept in oneDNN's blocked layout (module docstring)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKING_ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_product(x, self.packed_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every bfloat16 ``torch.nn.Linear`` on the CPU inside ``model.model`` (the decoder) by a
    :class:`PackedLinear`; returns how many were replaced (0 where the model has no ``model`` attribute, runs
    off the CPU or in another dtype, or :func:`packing_supported` is False)."""
    decoder = getattr(model, "model", None)
    if decoder is None or not packing_supported():
        return 0
    replaced = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced


def is_packed(model: torch.nn.Module) -> bool:
    """Whether any of ``model``'s layers is a :class:`PackedLinear`."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
