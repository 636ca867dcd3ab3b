"""Sampling parameters and the target distribution they define.

For temperature ``T > 0`` the target distribution at a node is

    p = normalise( top_p( top_k( softmax(logits / T) ) ) )

where ``top_k`` keeps the ``k`` most likely tokens (``k = 0``: all) and
``top_p`` keeps the smallest prefix of tokens sorted by probability whose mass
reaches ``top_p`` (the token that crosses the threshold is kept). ``T = 0``
means greedy: the distribution is a point mass on the argmax. Speculative
decoding with these parameters outputs exactly the distribution that plain
sampling from ``p`` would.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """How one request turns target logits into tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, description="Softmax temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1]; 1 keeps every token.")
    top_k: int = Field(0, description="Keep only the k most likely tokens; 0 keeps every token.")
    seed: int | None = Field(None, description="Seed of this request's random generator; None draws one.")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not v >= 0.0 or v != v or v == float("inf"):
            raise ValueError("temperature must be a finite number >= 0")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError("top_k must be >= 0")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target distribution ``p`` (float32, last dim) for non-greedy ``params``; see module docstring."""
    # shift before scaling, in float64: with a tiny T, logits / T overflows to inf (and T itself underflows
    # in float32), and softmax would turn inf - inf into nan; shifted, the argmax scales to 0, the rest to <= 0
    logits = logits.double()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(shifted / params.temperature, dim=-1).float()
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= params.top_p * sorted_p.sum(dim=-1, keepdim=True)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a random seed when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
