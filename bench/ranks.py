"""Where the target's greedy tokens rank among the drafter's guesses (teacher-forced).

For an output ``y`` the target produced after ``prompt``, one drafter forward
over ``prompt + y`` gives, at every output position ``i``, the drafter's
distribution over ``y_i`` given the true prefix. The rank of ``y_i`` in it,
and the drafter's confidence in its own first guess::

    r_i = 1 + #{v in V_i : logit_D(v | prompt, y_<i) > logit_D(y_i | prompt, y_<i)}   (cap + 1 if y_i not in V_i)
    p_i = max_{v in V_i} softmax_{V_i}(logit_D(. | prompt, y_<i))(v)

with ``V_i`` the draft vocabulary the drafter scores there (``cast_core.vocab``):
the core ids plus the rarer ids of ``prompt + y_<i``.

A draft tree whose siblings are kept best-first (EAGLE-2's, CAST's and
every top-k tree's are) holds the path ``y_i .. y_{i+d-1}`` only if it also
holds every higher-ranked sibling along it: at least ``r_i + ... + r_{i+d-1}``
drafted nodes. ``bench.bound.oracle_tree_bound`` turns that into a speedup
ceiling no such tree can beat, even one sized with hindsight;
``bench.bound.confidence_chain_bound`` replays chains that stop where ``p``
says to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cast_core.vocab import DraftVocab


@dataclass
class DrafterGuesses:
    """The drafter's teacher-forced guesses at each output position (see module docstring).

    Attributes:
        ranks: ``r_i``, ranks above the cap reported as ``cap + 1``.
        confidences: ``p_i``, rounded to 4 digits.
    """

    ranks: list[int]
    confidences: list[float]


@torch.inference_mode()
def teacher_forced_guesses(
    drafter: PreTrainedModel, prompt: list[int], output: list[int], cap: int, vocab: DraftVocab | None = None
) -> DrafterGuesses:
    """``r_i`` and ``p_i`` for every token of ``output`` (see module docstring); ``vocab``: the draft
    vocabulary (None: the drafter's whole vocabulary).

    Raises:
        ValueError: ``prompt`` empty or ``cap`` < 1.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if cap < 1:
        raise ValueError(f"cap must be >= 1; got {cap}")
    if not output:
        return DrafterGuesses([], [])
    ids = torch.tensor([prompt + output], dtype=torch.long, device=drafter.device)
    # the last len(output) + 1 positions; the final one predicts past the output
    logits = drafter(input_ids=ids, logits_to_keep=len(output) + 1).logits[0, :-1].float()
    if vocab is None:
        chosen = logits.gather(1, torch.tensor(output, device=logits.device).unsqueeze(1))
        ranks = (1 + (logits > chosen).sum(dim=1)).clamp(max=cap + 1).tolist()
        confidences = torch.softmax(logits, dim=-1).max(dim=-1).values.tolist()
        return DrafterGuesses(ranks, [round(c, 4) for c in confidences])
    rare = vocab.rare(prompt)
    ranks, confidences = [], []
    for row, token in zip(logits, output):
        scored = row.index_select(0, vocab.ids(rare).to(row.device))
        in_vocab = token < vocab.core_size or token in rare
        ranks.append(min(1 + int((scored > row[token]).sum()), cap + 1) if in_vocab else cap + 1)
        confidences.append(round(float(torch.softmax(scored, dim=0).max()), 4))
        rare |= vocab.rare([token])
    return DrafterGuesses(ranks, confidences)
