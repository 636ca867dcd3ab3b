"""Accepting a path of a verified draft tree: greedy and lossless sampling.

Both walk from the root. At node ``i`` the target distribution ``p_i`` comes
from the logits the target computed *at* node ``i`` (the prediction of the
token after it).

* Greedy: accept the child whose token equals ``argmax p_i``; stop when none
  does. The bonus token is ``argmax p_i`` at the last accepted node.
* Sampling (multi-candidate rejection sampling with deterministic drafts,
  ``q(x) = 1`` for each drafted sibling ``x``): keep a residual ``r = p_i``;
  for each child ``x`` in order of decreasing draft confidence, accept ``x``
  with probability ``r(x) / sum(r)``; on rejection set ``r(x) = 0`` and
  renormalise. If every child is rejected, the bonus token is sampled from the
  residual. This yields exactly one sample of ``p_i`` per visited node
  (sampling without replacement, stopped at the first success), so the output
  follows the target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cast_core.sampling import SamplingParams, target_probs
from cast_core.tree import DraftTree


@dataclass
class AcceptedPath:
    """Result of acceptance for one row.

    Attributes:
        nodes: accepted node indices, root first (``[0, ...]``).
        tokens: the new tokens: accepted draft tokens then the bonus token.
    """

    nodes: list[int]
    tokens: list[int]

    @property
    def accepted_drafts(self) -> int:
        """Drafted tokens accepted (the bonus token not counted)."""
        return len(self.nodes) - 1


def accept_greedy(tree: DraftTree, logits: torch.Tensor, b: int) -> AcceptedPath:
    """Greedy acceptance for row ``b``; ``logits`` is ``[n, V]`` for that row."""
    # max's indices are argmax's (the first maximal value on ties), but in bfloat16 on the CPU 4-5x cheaper
    # (8 rows x 5 nodes x 151936 logits: 13 ms per step against 2.9 ms, Intel Xeon with AMX)
    best = logits.max(dim=-1).indices.tolist()
    tokens = tree.tokens[b].tolist()
    kids = tree.children(b)
    node, nodes, out = 0, [0], []
    while True:
        want = best[node]
        nxt = next((c for c in kids[node] if tokens[c] == want), None)
        if nxt is None:
            out.append(want)
            return AcceptedPath(nodes=nodes, tokens=out)
        nodes.append(nxt)
        out.append(want)
        node = nxt


def accept_sampled(
    tree: DraftTree, logits: torch.Tensor, b: int, params: SamplingParams, generator: torch.Generator
) -> AcceptedPath:
    """Lossless rejection-sampling acceptance for row ``b`` (see module docstring)."""
    tokens = tree.tokens[b].tolist()
    kids = tree.children(b)
    node, nodes, out = 0, [0], []
    while True:
        residual = target_probs(logits[node], params).cpu()  # the request's generator draws on the CPU
        accepted = None
        for child in kids[node]:
            total = float(residual.sum())
            mass = float(residual[tokens[child]])
            if total > 0 and torch.rand((), generator=generator).item() * total < mass:
                accepted = child
                break
            residual[tokens[child]] = 0.0
        if accepted is None:
            if float(residual.sum()) <= 0:
                residual = target_probs(logits[node], params).cpu()  # unreachable for exact arithmetic
            token = int(torch.multinomial(residual, 1, generator=generator))
            out.append(token)
            return AcceptedPath(nodes=nodes, tokens=out)
        nodes.append(accepted)
        out.append(tokens[accepted])
        node = accepted
