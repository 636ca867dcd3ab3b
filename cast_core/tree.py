"""Draft trees as flat, batched arrays.

A draft tree for one sequence is a list of nodes in which every parent precedes
its children. Node 0 is the *root*: the last committed token, whose KV entry is
not yet in the verifier's cache. Every other node is a drafted token. For a
batch, trees are padded to the same node count ``n``; padding nodes are marked
invalid, have the root as parent and see only themselves.

Derived quantities (all per row ``b``):

* ``ancestors[b, i, j]`` is True iff node ``j`` is node ``i`` or one of its
  ancestors. It is the tree part of the attention mask: a node attends to the
  committed prefix and to exactly these slots.
* ``position_ids[b, i] = next_pos[b] + depth[b, i]`` where ``next_pos`` is the
  position of the root.
* ``children(b)[i]`` lists the children of node ``i`` ordered by decreasing path
  confidence ``v`` (the order in which acceptance tries siblings).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """A batch of padded draft trees.

    Attributes:
        tokens: ``[B, n]`` token id per node; column 0 is the root.
        parents: ``[B, n]`` parent node index, ``-1`` for the root (and 0 for padding).
        depth: ``[B, n]`` distance from the root (root = 0).
        confidence: ``[B, n]`` path confidence ``v`` = product of draft
            probabilities along the path from the root (root = 1).
        valid: ``[B, n]`` False for padding nodes.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depth: torch.Tensor
    confidence: torch.Tensor
    valid: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_nodes(self) -> int:
        """Padded node count ``n`` (root included)."""
        return int(self.tokens.shape[1])

    def sizes(self) -> list[int]:
        """Number of valid nodes per row (root included)."""
        return self.valid.sum(dim=1).tolist()

    @staticmethod
    def chains(root_tokens: torch.Tensor, chains: list[list[int]]) -> "DraftTree":
        """Per row, the root followed by the chain ``chains[b]`` (each token the child of the one before),
        padded to the longest chain; chain nodes carry ``v = 1`` (a chain has no siblings to order)."""
        bsz, length = len(chains), max((len(c) for c in chains), default=0)
        tokens = torch.zeros((bsz, 1 + length), dtype=torch.long)
        tokens[:, 0] = root_tokens
        valid = torch.zeros((bsz, 1 + length), dtype=torch.bool)
        valid[:, 0] = True
        for b, chain in enumerate(chains):
            tokens[b, 1 : 1 + len(chain)] = torch.tensor(chain, dtype=torch.long)
            valid[b, 1 : 1 + len(chain)] = True
        steps = torch.arange(1 + length).expand(bsz, -1)
        return DraftTree(
            tokens=tokens,
            parents=torch.where(valid, steps - 1, 0).masked_fill(steps == 0, -1),
            depth=torch.where(valid, steps, 0),
            confidence=valid.float(),
            valid=valid,
        )

    @staticmethod
    def roots(root_tokens: torch.Tensor) -> "DraftTree":
        """Trees holding only their root: plain autoregressive decoding."""
        b = root_tokens.shape[0]
        return DraftTree(
            tokens=root_tokens.reshape(b, 1).long(),
            parents=torch.full((b, 1), -1, dtype=torch.long),
            depth=torch.zeros((b, 1), dtype=torch.long),
            confidence=torch.ones((b, 1), dtype=torch.float32),
            valid=torch.ones((b, 1), dtype=torch.bool),
        )

    @staticmethod
    def stack(trees: list["DraftTree"]) -> "DraftTree":
        """Pad single-row trees (or batches) of different sizes into one batch."""
        n = max(t.num_nodes for t in trees)
        padded = [t.padded(n) for t in trees]
        return DraftTree(
            tokens=torch.cat([t.tokens for t in padded]),
            parents=torch.cat([t.parents for t in padded]),
            depth=torch.cat([t.depth for t in padded]),
            confidence=torch.cat([t.confidence for t in padded]),
            valid=torch.cat([t.valid for t in padded]),
        )

    def padded(self, num_nodes: int) -> "DraftTree":
        """These trees with padding nodes appended up to ``num_nodes`` nodes per row (self if already there).

        Padding nodes (token 0, parent 0, depth 0, confidence 0, invalid) see only
        themselves and are never accepted, so verifying them changes no output.
        """
        extra = num_nodes - self.num_nodes
        if extra <= 0:
            return self
        rows = self.batch_size

        def pad(x: torch.Tensor, value: float | int | bool) -> torch.Tensor:
            return torch.cat([x, torch.full((rows, extra), value, dtype=x.dtype)], dim=1)

        return DraftTree(
            tokens=pad(self.tokens, 0),
            parents=pad(self.parents, 0),
            depth=pad(self.depth, 0),
            confidence=pad(self.confidence, 0.0),
            valid=pad(self.valid, False),
        )

    def row(self, b: int) -> "DraftTree":
        """Row ``b`` alone, trimmed of trailing padding."""
        n = int(self.valid[b].nonzero().max()) + 1
        return DraftTree(
            tokens=self.tokens[b : b + 1, :n].clone(),
            parents=self.parents[b : b + 1, :n].clone(),
            depth=self.depth[b : b + 1, :n].clone(),
            confidence=self.confidence[b : b + 1, :n].clone(),
            valid=self.valid[b : b + 1, :n].clone(),
        )

    def ancestors(self) -> torch.Tensor:
        """``[B, n, n]`` bool: ``anc[b, i, j]`` iff ``j`` is ``i`` or an ancestor of ``i``.

        Built layer by layer: ``anc[i] = anc[parent(i)] | onehot(i)``; parents
        precede children, so processing nodes by increasing depth suffices.
        Padding nodes see only themselves.
        """
        b, n = self.tokens.shape
        eye = torch.eye(n, dtype=torch.bool).expand(b, n, n).clone()
        anc = eye.clone()
        parent = self.parents.clamp(min=0)
        max_depth = int(self.depth.max()) if n > 0 else 0
        for d in range(1, max_depth + 1):
            at_depth = (self.depth == d) & self.valid  # [B, n]
            if not bool(at_depth.any()):
                continue
            parent_rows = torch.gather(anc, 1, parent[:, :, None].expand(b, n, n))  # [B, n, n]
            anc = torch.where(at_depth[:, :, None], parent_rows | eye, anc)
        return anc

    def position_ids(self, next_pos: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` positions: ``next_pos[b] + depth[b, i]``."""
        return next_pos[:, None] + self.depth.to(next_pos.device)

    def children(self, b: int) -> list[list[int]]:
        """Children of every node of row ``b``, each list by decreasing confidence."""
        n = self.num_nodes
        kids: list[list[int]] = [[] for _ in range(n)]
        parents = self.parents[b].tolist()
        valid = self.valid[b].tolist()
        conf = self.confidence[b].tolist()
        for i in range(1, n):
            if valid[i]:
                kids[parents[i]].append(i)
        for lst in kids:
            if len(lst) > 1:
                lst.sort(key=lambda j: -conf[j])
        return kids

    def validate(self) -> None:
        """Raise ``ValueError`` unless parents precede children and depths agree."""
        if self.tokens.dim() != 2:
            raise ValueError("tree.tokens must be [batch, nodes]")
        shape = self.tokens.shape
        for name in ("parents", "depth", "confidence", "valid"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"tree.{name} must have shape {tuple(shape)}")
        if not bool(self.valid[:, 0].all()):
            raise ValueError("tree root (node 0) must be valid in every row")
        idx = torch.arange(shape[1])
        real = self.valid.clone()
        real[:, 0] = False
        if bool((real & (self.parents >= idx)).any()) or bool((real & (self.parents < 0)).any()):
            raise ValueError("tree.parents: every parent must precede its child")
        parent_depth = torch.gather(self.depth, 1, self.parents.clamp(min=0))
        if bool((real & (self.depth != parent_depth + 1)).any()):
            raise ValueError("tree.depth must be parent depth + 1")
        parent_valid = torch.gather(self.valid, 1, self.parents.clamp(min=0))
        if bool((real & ~parent_valid).any()):
            raise ValueError("tree.valid: a valid node has a padding parent")
