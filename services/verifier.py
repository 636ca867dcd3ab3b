"""The Verifier deployment: target-model sessions, verify steps batched into one forward.

Per session: ``open`` (prefill the committed tokens), ``verify`` (one step:
the drafted tree -> accepted path, committed), ``close``. Concurrent sessions'
``verify`` calls are batched with ``@serve.batch`` and run as one
``VerifierSessions.verify`` call: one target forward for all of them. The
batch size limit follows the replica's live sessions (capped by config), so a
step runs as soon as every live session has sent it.

Occupancy (live sessions and the last forward's batch size) is published to
the request router (``record_routing_stats``), to Prometheus and, every
``occupancy_report_s``, to the Planner together with this replica's device kind.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from cast_core.models import load_model, resolve_model
from cast_core.sampling import SamplingParams
from cast_core.sessions import SessionNotFound, VerifierSessions
from cast_core.verifier import Verifier
from services.config import AppConfig
from services.messages import DraftOutput, SessionInfo, StepOutput, tree_unpickle_count
from services.replica import ModelReplica
from services.telemetry import VerifierMetrics

logger = logging.getLogger(__name__)


class VerifierReplica(ModelReplica):
    """One verifier replica (deployed as ``Verifier``)."""

    role = "verifier"

    async def __init__(self, config: AppConfig, planner: DeploymentHandle) -> None:
        super().__init__(config)
        self._planner = planner
        self._sessions: VerifierSessions | None = None
        self._last_batch = 0
        self._opened = 0
        self._metrics = VerifierMetrics()
        self._verify_batch.set_batch_wait_timeout_s(config.verifier_batching.batch_wait_timeout_s)
        self._verify_batch.set_max_batch_size(1)
        await self.load(self._load)
        if self._load_error is None:
            self.spawn(self._report_loop())

    def _load(self) -> None:
        model = load_model(resolve_model(self.config.target), self.config.dtype, self.config.device)
        self._sessions = VerifierSessions(Verifier(model), self.config.max_sessions_per_replica)

    @property
    def sessions(self) -> VerifierSessions:
        self.ensure_loaded()
        assert self._sessions is not None
        return self._sessions

    @property
    def occupancy(self) -> int:
        return self._sessions.occupancy if self._sessions is not None else 0

    def on_sessions_changed(self) -> None:
        cap = self.config.verifier_batching.max_batch_size
        self._verify_batch.set_max_batch_size(max(1, min(cap, self.occupancy)))
        self._metrics.record(self.occupancy, self._last_batch)

    async def open(self, session_id: str, token_ids: list[int], params: SamplingParams) -> SessionInfo:
        """Prefill a session (all of ``token_ids`` but the last, which is the first root)."""
        self.refuse_if_closed(session_id)
        await self.run(self.sessions.open, session_id, token_ids, params)
        self._opened += 1
        self.on_sessions_changed()
        return self.info

    async def close(self, session_id: str) -> None:
        """Free a session's state (unknown ids are ignored); a later open of it is refused."""
        self.forget_session(session_id)
        await self.run(self.sessions.close, [session_id])
        self.on_sessions_changed()

    def evict_idle(self, older_than_s: float) -> list[str]:
        return self.sessions.evict_idle(older_than_s)

    async def verify(self, session_id: str, draft: DraftOutput) -> StepOutput:
        """Verify and commit one drafted tree of ``session_id`` (batched with other sessions)."""
        self.ensure_loaded()
        result = await self._verify_batch(session_id, draft)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.01)
    async def _verify_batch(self, session_ids: list[str], drafts: list[DraftOutput]) -> list[StepOutput | Exception]:
        return await self.run(self._verify_now, session_ids, drafts)

    def _verify_now(self, session_ids: list[str], drafts: list[DraftOutput]) -> list[StepOutput | Exception]:
        live = set(self.sessions.sessions())
        trees = {sid: d.tree.tree for sid, d in zip(session_ids, drafts) if sid in live}
        started = time.perf_counter()
        paths = self.sessions.verify(trees) if trees else {}
        verify_s = time.perf_counter() - started
        self._last_batch = len(trees)
        results: list[StepOutput | Exception] = []
        for sid, draft in zip(session_ids, drafts):
            if sid not in paths:
                results.append(SessionNotFound(sid))
                continue
            path = paths[sid]
            results.append(
                StepOutput(
                    tokens=path.tokens,
                    accepted=path.accepted_drafts,
                    verified_nodes=int(draft.tree.tree.valid.sum()),
                    nodes_drafted=draft.nodes_drafted,
                    draft_s=draft.draft_s,
                    verify_s=verify_s,
                    batch_sessions=len(trees),
                    occupancy=self.sessions.occupancy,
                    plan_batch=draft.plan_batch,
                )
            )
        return results

    def record_routing_stats(self) -> dict[str, int | str]:
        """Published to request routers (``RunningReplica.routing_stats``)."""
        return {"sessions": self.occupancy, "last_batch_size": self._last_batch, "device": self.info.device}

    async def _report_loop(self) -> None:
        last: tuple[int, int] | None = None
        last_sent = 0.0
        while True:
            now = time.monotonic()
            state = (self.occupancy, self._last_batch)
            if state != last or now - last_sent > 1.0:
                try:
                    await self._planner.report.remote(self.replica_id, self.info.device, *state)
                    last, last_sent = state, now
                except Exception as err:  # the planner restarting must not kill the loop
                    logger.warning("verifier %s: occupancy report failed: %s", self.replica_id, err)
                self._metrics.record(*state)
            await asyncio.sleep(self.config.occupancy_report_s)

    async def debug_state(self) -> dict[str, object]:
        """Sessions held and DraftTree deserialisations in this process (tests, debugging)."""
        return {
            "replica_id": self.replica_id,
            "node_id": self.info.node_id,
            "sessions": self.sessions.sessions() if self._sessions is not None else [],
            "tree_unpickles": tree_unpickle_count(),
            "last_batch_size": self._last_batch,
            "sessions_opened": self._opened,
        }

    async def debug_drop_sessions(self) -> list[str]:
        """Forget every session, as a restarted replica would (tests of the re-open path)."""
        dropped = await self.run(self.sessions.sessions)
        await self.run(self.sessions.close, dropped)
        self.on_sessions_changed()
        return dropped
