"""Messages passed between deployments: session info, a drafted tree, a verified step.

The draft tree travels drafter -> verifier as a Ray object ref (the router
chains the two ``DeploymentResponse`` objects and never reads the tree). To
make that checkable, the tree rides in ``TreePayload``, which counts how many
times it was unpickled in the current process (``tree_unpickle_count``): the
verifier's count grows with every step, the router's stays 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from cast_core.tree import DraftTree

_lock = threading.Lock()
_unpickled = 0


def tree_unpickle_count() -> int:
    """How many ``TreePayload`` objects were deserialised in this process."""
    return _unpickled


class TreePayload:
    """A single-row ``DraftTree`` in transit; counts its deserialisations per process."""

    def __init__(self, tree: DraftTree) -> None:
        self.tree = tree

    def __getstate__(self) -> dict[str, Any]:
        return {"tree": self.tree}

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _unpickled
        with _lock:
            _unpickled += 1
        self.tree = state["tree"]


@dataclass
class SessionInfo:
    """Where a session was opened.

    Attributes:
        replica_id: unique id of the replica holding the session's state.
        node_id: Ray node of that replica.
        device: device kind of the replica (``cast_core.cost.device_name``).
    """

    replica_id: str
    node_id: str
    device: str


@dataclass
class DraftOutput:
    """One session's drafted tree and what drafting it cost.

    Attributes:
        tree: the tree to verify (root = the session's last committed token).
        nodes_drafted: nodes the drafter built for this step (before reranking).
        draft_s: seconds of the drafter's batched forwards for this step.
        plan_batch: verifier batch size ``B`` the cost context was read at (0: no cost context).
    """

    tree: TreePayload
    nodes_drafted: int
    draft_s: float
    plan_batch: int

    @staticmethod
    def root_only(token: int) -> "DraftOutput":
        """A tree of just the root: one plain decoding step (policy ``none``)."""
        return DraftOutput(TreePayload(DraftTree.roots(torch.tensor([token]))), 0, 0.0, 0)


@dataclass
class StepOutput:
    """One verified step of one session.

    Attributes:
        tokens: new committed tokens: accepted drafts, then the bonus token.
        accepted: drafted tokens accepted (bonus not counted).
        verified_nodes: tree nodes sent through the target, root included.
        nodes_drafted: passed through from ``DraftOutput``.
        draft_s: passed through from ``DraftOutput``.
        verify_s: seconds of the batched target forward this step took part in.
        batch_sessions: sessions stepped in that forward.
        occupancy: live sessions (rows) on the verifier replica at that forward.
        plan_batch: passed through from ``DraftOutput``.
    """

    tokens: list[int]
    accepted: int
    verified_nodes: int
    nodes_drafted: int
    draft_s: float
    verify_s: float
    batch_sessions: int
    occupancy: int
    plan_batch: int
