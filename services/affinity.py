"""Session affinity for the drafter and verifier pools, through Serve's request-router API.

A session's KV state lives on one replica, so every call that names the
session (``handle.options(session_id=sid)``) must reach that replica. The
router instance lives in the caller's process (one per deployment handle, shared
by its ``.options()`` copies) and keeps ``session id -> replica``:

* a known session whose replica is alive goes to that replica only (the retry
  loop backs off while it is busy; it never spills elsewhere);
* a new session, or one whose replica is gone, is assigned the replica with
  the fewest sessions (this router's own assignments first, then the
  replica's published ``routing_stats['sessions']``, then queue length) and
  remembered. A step that lands on a fresh replica raises ``SessionNotFound``
  there, and the caller re-opens the session (routed to the same new replica);
* ``close`` goes to the owner; the session is forgotten when the close completes.

Calls without a session id go to the least-loaded replica. Only the caller that
drives a session (one ingress request) sends its calls, so a per-process map is
the complete truth for that session.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)

CLOSE_METHOD = "close"


class SessionAffinityRouter(RequestRouter):
    """Routes every call of a session to the replica that holds it (see module docstring).

    Kwargs (``RequestRouterConfig.request_router_kwargs``):
        max_tracked_sessions: bound of the session map (least recently used dropped first).
    """

    def initialize_state(self, max_tracked_sessions: int = 100_000, **kwargs) -> None:
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()
        self._assigned: Counter[ReplicaID] = Counter()
        self._max_tracked = max_tracked_sessions
        self._closing: dict[str, str] = {}  # internal request id of a close call -> its session

    def owner_of(self, session_id: str) -> ReplicaID | None:
        """The replica this router sends ``session_id``'s calls to (None if unknown)."""
        return self._owner.get(session_id)

    def _forget(self, session_id: str) -> None:
        owner = self._owner.pop(session_id, None)
        if owner is not None:
            self._assigned[owner] -= 1
            if self._assigned[owner] <= 0:
                del self._assigned[owner]

    def _assign(self, session_id: str, replica: RunningReplica) -> None:
        self._forget(session_id)
        self._owner[session_id] = replica.replica_id
        self._assigned[replica.replica_id] += 1
        while len(self._owner) > self._max_tracked:
            self._forget(next(iter(self._owner)))

    def _load(self, replica: RunningReplica) -> tuple[int, int, int]:
        stats = replica.routing_stats or {}
        queue = self.replica_queue_len_cache.get(replica.replica_id)
        return (self._assigned[replica.replica_id], int(stats.get("sessions", 0)), queue or 0)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_load = sorted(candidate_replicas, key=self._load)
        session_id = pending_request.metadata.session_id if pending_request is not None else ""
        if not session_id:
            return [by_load]
        pending_request.routing_context.should_backoff = True
        owner = self._owner.get(session_id)
        chosen = next((r for r in candidate_replicas if r.replica_id == owner), None)
        if chosen is None:
            if owner is not None:
                logger.warning("session %s: replica %s is gone; reassigning", session_id, owner)
            chosen = by_load[0]
            self._assign(session_id, chosen)
        else:
            self._owner.move_to_end(session_id)
        if pending_request.metadata.call_method == CLOSE_METHOD:
            self._closing[pending_request.metadata.internal_request_id] = session_id
        return [[chosen]]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        session_id = self._closing.pop(internal_request_id, None)
        if session_id is not None:
            self._forget(session_id)
