"""Where the target's greedy tokens rank among the drafter's guesses (teacher-forced).

For an output ``y`` the target produced after ``prompt``, one drafter forward
over ``prompt + y`` gives, at every output position ``i``, the drafter's
distribution over ``y_i`` given the true prefix. The rank of ``y_i`` in it,
and the drafter's confidence in its own first guess::

    r_i = 1 + #{v : logit_D(v | prompt, y_<i) > logit_D(y_i | prompt, y_<i)}
    p_i = max_v softmax(logit_D(. | prompt, y_<i))(v)

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
def teacher_forced_guesses(drafter: PreTrainedModel, prompt: list[int], output: list[int], cap: int) -> DrafterGuesses:
    """``r_i`` and ``p_i`` for every token of ``output`` (see module docstring).

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
    chosen = logits.gather(1, torch.tensor(output, device=logits.device).unsqueeze(1))
    ranks = 1 + (logits > chosen).sum(dim=1)
    confidences = torch.softmax(logits, dim=-1).max(dim=-1).values
    return DrafterGuesses(ranks.clamp(max=cap + 1).tolist(), [round(c, 4) for c in confidences.tolist()])
