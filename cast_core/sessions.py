"""Per-session model state for a serving replica: sessions are rows of one batched KV state.

A drafter or verifier replica serves many independent sessions whose steps
arrive in dynamic batches. Each session owns one row of the replica's
``KVState``; a batched call names the sessions taking part, and the other
rows ride along idle (a root-only dummy for the verifier, an empty catch-up
chain for the drafter) and keep nothing. Opening a session prefills its
tokens in a batch-1 state and appends it as a row; closing drops the row.

Both classes are plain, single-threaded objects: the replica must serialise
calls (one worker thread). ``SessionNotFound`` tells the caller to re-open the
session (a replica restarted or the session idled out): the caller holds every
committed token and re-prefills, so nothing is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cast_core.acceptance import AcceptedPath
from cast_core.drafter import DraftResult, Drafter
from cast_core.kv import KVState
from cast_core.policy import CostContext, RowPlan, TreePolicy
from cast_core.sampling import SamplingParams, make_generator
from cast_core.tree import DraftTree
from cast_core.verifier import Verifier


class SessionNotFound(KeyError):
    """The session has no state on this replica (never opened, closed, or evicted)."""


@dataclass
class _Row:
    session_id: str
    last_used: float = field(default_factory=time.monotonic)


class _SessionRows:
    """Session id <-> row bookkeeping over one ``KVState``."""

    def __init__(self, state: KVState, max_sessions: int) -> None:
        self.state = state
        self.rows: list[_Row] = []
        self.max_sessions = max_sessions

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, session_id: str) -> bool:
        return any(r.session_id == session_id for r in self.rows)

    def index(self, session_id: str) -> int:
        for i, r in enumerate(self.rows):
            if r.session_id == session_id:
                r.last_used = time.monotonic()
                return i
        raise SessionNotFound(session_id)

    def add(self, session_id: str, state: KVState) -> None:
        if session_id in self:
            self.remove([session_id])
        if len(self.rows) >= self.max_sessions:
            raise RuntimeError(f"replica holds its maximum of {self.max_sessions} sessions")
        self.state.extend(state)
        self.rows.append(_Row(session_id))

    def remove(self, session_ids: list[str]) -> list[int]:
        """Drop sessions (unknown ids are ignored); returns the kept row indices."""
        drop = set(session_ids)
        keep = [i for i, r in enumerate(self.rows) if r.session_id not in drop]
        if len(keep) != len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.state.select_rows(keep)
        return keep

    def idle(self, older_than_s: float) -> list[str]:
        now = time.monotonic()
        return [r.session_id for r in self.rows if now - r.last_used > older_than_s]


class VerifierSessions:
    """Target-model state of many sessions; verifies any subset of them in one forward."""

    def __init__(self, verifier: Verifier, max_sessions: int = 64) -> None:
        self.verifier = verifier
        self._rows = _SessionRows(verifier.new_state(0), max_sessions)
        self._params: dict[str, tuple[SamplingParams, torch.Generator]] = {}

    @property
    def occupancy(self) -> int:
        """Live sessions on this replica (rows of every batched forward)."""
        return len(self._rows)

    def sessions(self) -> list[str]:
        return [r.session_id for r in self._rows.rows]

    def open(self, session_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """Prefill ``token_ids[:-1]``; the last token is the first root."""
        if not token_ids:
            raise ValueError("token_ids: must not be empty")
        state = self.verifier.new_state(1)
        self.verifier.prefill(state, [token_ids])
        self._rows.add(session_id, state)
        self._params[session_id] = (params, make_generator(params.seed))

    def close(self, session_ids: list[str]) -> None:
        self._rows.remove(session_ids)
        for sid in session_ids:
            self._params.pop(sid, None)

    def evict_idle(self, older_than_s: float) -> list[str]:
        """Close sessions unused for ``older_than_s`` seconds; returns their ids."""
        stale = self._rows.idle(older_than_s)
        self.close(stale)
        return stale

    def verify(self, trees: dict[str, DraftTree]) -> dict[str, AcceptedPath]:
        """Verify one single-row tree per named session in one target forward.

        Raises ``SessionNotFound`` (before any forward) if a session is unknown.
        """
        rows = {sid: self._rows.index(sid) for sid in trees}
        batch: list[DraftTree] = []
        for i, row in enumerate(self._rows.rows):
            tree = trees.get(row.session_id)
            batch.append(tree if tree is not None else DraftTree.roots(torch.zeros(1, dtype=torch.long)))
        stacked = DraftTree.stack(batch)
        params = [self._params[r.session_id][0] for r in self._rows.rows]
        gens = [self._params[r.session_id][1] for r in self._rows.rows]
        paths = self.verifier.verify(self._rows.state, stacked, params, gens, keep_rows=set(rows.values()))
        return {sid: paths[i] for sid, i in rows.items()}


class DrafterSessions:
    """Drafter-model state of many sessions; drafts for any subset of them together."""

    def __init__(self, drafter: Drafter, policy: TreePolicy, max_sessions: int = 64) -> None:
        self.drafter = drafter
        self.policy = policy
        self._rows = _SessionRows(drafter.new_state(0), max_sessions)
        self._plans: dict[str, RowPlan] = {}

    @property
    def occupancy(self) -> int:
        return len(self._rows)

    def sessions(self) -> list[str]:
        return [r.session_id for r in self._rows.rows]

    def open(self, session_id: str, token_ids: list[int], tokens_left: int | None = None) -> None:
        """Add a session that may still generate ``tokens_left`` tokens (None: unbounded); ``token_ids[:-1]``
        wait as its backlog (fed at its first drafted step, never while the speedup gate keeps the drafter
        idle, through a window where feeding them whole does not pay); the last token is the first step's pending root."""
        if not token_ids:
            raise ValueError("token_ids: must not be empty")
        if tokens_left is not None and tokens_left < 0:
            raise ValueError(f"tokens_left: must be >= 0; got {tokens_left}")
        self._rows.add(session_id, self.drafter.new_state(1))
        plan = self.policy.new_row_plan(tokens_left)
        plan.backlog = list(token_ids[:-1])
        self._plans[session_id] = plan

    def close(self, session_ids: list[str]) -> None:
        self._rows.remove(session_ids)
        for sid in session_ids:
            self._plans.pop(sid, None)

    def evict_idle(self, older_than_s: float) -> list[str]:
        stale = self._rows.idle(older_than_s)
        self.close(stale)
        return stale

    def draft(
        self, pending: dict[str, list[int]], ctx: CostContext | None, step_s: dict[str, float] | None = None
    ) -> dict[str, tuple[DraftTree, DraftResult]]:
        """Catch up each named session on its pending tokens and draft its tree (batch-planned together).

        ``step_s[sid]``: seconds the session's last step took by its own forwards (draft and verify), which
        the speedup gate judges it by; a session not in it is judged by the wall time since its last
        drafting call (``Drafter.draft``). Returns per session its single-row tree and the batch's ``DraftResult``.
        """
        rows = {sid: self._rows.index(sid) for sid in pending}
        for sid, tokens in pending.items():
            if not tokens:
                raise ValueError(f"pending[{sid!r}]: must end with the session's root token")
        chains = [pending.get(r.session_id, []) for r in self._rows.rows]
        plans = [self._plans[r.session_id] for r in self._rows.rows]
        walls = [None if step_s is None else step_s.get(r.session_id) for r in self._rows.rows]
        result = self.drafter.draft(self._rows.state, chains, self.policy, ctx, plans, walls)
        return {sid: (result.tree.row(i), result) for sid, i in rows.items()}
