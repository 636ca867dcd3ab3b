"""The drafter's output vocabulary: a core of leading token ids plus the rows' own rarer tokens.

The vocabulary projection is the largest matmul of a small drafter, and the
softmax over its output the costliest elementwise work of a drafted layer. On
the 2-core AMD EPYC (Qwen2.5-0.5B, bf16, 151,936 ids) projecting, normalising
and ranking 10 hidden rows (a B=1 tree layer) took 25 ms, 80 rows (B=8) 140 ms;
over the first 32,768 ids, 5 ms and 20 ms. A draft only has to be likely, never
exact: the verifier decides every committed token, and acceptance treats drafts
as deterministic (``q(x) = 1``, :mod:`cast_core.acceptance`), so scoring fewer
ids changes which trees are drafted, never the output, greedy or sampled.

The drafter scores

    V_D = {0, ..., N - 1}  U  R

``N``: ``core_size`` leading ids (byte-level BPE numbers its pieces in merge
order, most frequent first); ``R``: the ids ``>= N`` that the batch's rows have
in their own context (a prompt's identifiers recur in its completion). On
HumanEval's canonical solutions (Qwen2.5 tokenizer) the first 32,768 ids cover
96.3 % of the tokens, with the prompt's own ids 97.9 %. ``p_D`` is normalised
over ``V_D``: the mass outside it is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

#: default ``N``: leading token ids every drafted layer scores
DEFAULT_CORE_SIZE = 32768


@dataclass
class DraftHead:
    """The output head of one drafted step: logits over ``ids`` (local index ``j`` scores token ``ids[j]``)."""

    ids: torch.Tensor
    core_weight: torch.Tensor
    rare_weight: torch.Tensor
    core_bias: torch.Tensor | None
    rare_bias: torch.Tensor | None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., |V_D|]`` logits of final hidden states ``[..., H]``: the core ids', then the rare ids'."""
        core = torch.nn.functional.linear(hidden, self.core_weight, self.core_bias)
        if self.rare_weight.shape[0] == 0:
            return core
        return torch.cat([core, torch.nn.functional.linear(hidden, self.rare_weight, self.rare_bias)], dim=-1)

    def local(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's index in ``ids`` (-1 where it is outside ``V_D``): the core ids are ``0..N-1``, the rare ones sorted after them."""
        core = self.core_weight.shape[0]
        rare = self.ids[core:]
        at = torch.searchsorted(rare, tokens.clamp(min=core)).clamp(max=max(len(rare) - 1, 0))
        in_rare = (rare[at] == tokens) if len(rare) else torch.zeros_like(tokens, dtype=torch.bool)
        return torch.where(tokens < core, tokens, torch.where(in_rare, at + core, -1))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The ``ids`` columns of full-vocabulary logits (models whose head cannot be split off)."""
        return logits.index_select(-1, self.ids)


class DraftVocab:
    """``V_D`` of a drafter: its core rows, cached contiguous, and heads for a batch's rare ids."""

    def __init__(self, model: torch.nn.Module, accepted: int, core_size: int | None = DEFAULT_CORE_SIZE) -> None:
        """``accepted``: ids the target accepts (the drafter's beyond it are never scored);
        ``core_size``: ``N`` (None: every accepted id).

        Raises:
            ValueError: naming ``core_size`` if it is below 1.
        """
        if core_size is not None and core_size < 1:
            raise ValueError(f"core_size must be >= 1 or None; got {core_size}")
        head = model.get_output_embeddings()
        self._weight: torch.Tensor = head.weight
        self._bias: torch.Tensor | None = getattr(head, "bias", None)
        self.accepted = min(accepted, self._weight.shape[0])
        self.core_size = self.accepted if core_size is None else min(core_size, self.accepted)
        self._core_weight = self._weight[: self.core_size].contiguous()
        self._core_bias = None if self._bias is None else self._bias[: self.core_size].contiguous()
        self._core_ids = torch.arange(self.core_size, device=self._weight.device)

    def rare(self, tokens: Iterable[int]) -> set[int]:
        """The ids of ``tokens`` outside the core that the target accepts (``N <= id < accepted``)."""
        return {t for t in tokens if self.core_size <= t < self.accepted}

    def ids(self, rare: Iterable[int] = ()) -> torch.Tensor:
        """``V_D`` in scoring order: the core ids, then the ``rare`` ones ascending."""
        return torch.cat([self._core_ids, torch.tensor(sorted(rare), dtype=torch.long, device=self._weight.device)])

    def head(self, rare: Iterable[int] = ()) -> DraftHead:
        """The head scoring the core and the ``rare`` ids (the batch's union)."""
        ids = self.ids(rare)
        rare_ids = ids[self.core_size :]
        return DraftHead(
            ids=ids,
            core_weight=self._core_weight,
            rare_weight=self._weight.index_select(0, rare_ids),
            core_bias=self._core_bias,
            rare_bias=None if self._bias is None else self._bias.index_select(0, rare_ids),
        )
