"""The Verifier deployment: target-model sessions, verify steps batched into one forward.

Per session: ``open`` (prefill the committed tokens), ``verify`` (one step:
the drafted tree -> accepted path, committed), ``close``. Concurrent sessions'
``verify`` calls are batched (``services.batcher.StepBatcher``) and run as one
``VerifierSessions.verify`` call: one target forward for all of them. The
batch size limit follows the replica's live sessions (capped by config), so a
step runs as soon as every live session has sent it.

Occupancy (live sessions and the last forward's batch size) is published to
the request router (``record_routing_stats``), to Prometheus and, every
``occupancy_report_s``, to the Planner together with this replica's device kind.

Loading checks that the drafter shares the target's tokenizer
(``check_drafter_tokenizer``): the drafter pool never needs the target's files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ray.serve.handle import DeploymentHandle

from cast_core.cost import CostProfile, find_profile
from cast_core.models import check_tokenizers_compatible, load_model, load_tokenizer, resolve_model
from cast_core.sampling import SamplingParams
from cast_core.sessions import SessionNotFound, VerifierSessions
from cast_core.verifier import Verifier
from services.config import AppConfig
from services.messages import DraftOutput, SessionInfo, StepOutput
from services.replica import ModelReplica
from services.telemetry import VerifierMetrics

logger = logging.getLogger(__name__)


def check_drafter_tokenizer(target_path: Path, drafter_path: Path, target_vocab_size: int) -> None:
    """Raise ``ValueError`` unless the drafter shares the target's tokenizer and the target accepts all its ids.

    Checked here, where the target is at hand, so that a drafter replica needs
    only its own model's files: it drafts within the shared tokenizer's ids.
    """
    tokenizer = load_tokenizer(target_path)
    check_tokenizers_compatible(tokenizer, load_tokenizer(drafter_path))
    if len(tokenizer) > target_vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids but the target's embedding only {target_vocab_size}")


class VerifierReplica(ModelReplica[VerifierSessions]):
    """One verifier replica (deployed as ``Verifier``)."""

    role = "verifier"

    async def __init__(self, config: AppConfig, planner: DeploymentHandle) -> None:
        super().__init__(config, config.verifier_batching, self._verify_batch)
        self._planner = planner
        self._last_batch = 0
        self._opened = 0
        self._metrics = VerifierMetrics()
        await self.load(self._load)
        if self._load_error is None:
            self.spawn(self._report_loop())

    def _load(self) -> None:
        target_path = resolve_model(self.config.target)
        model = load_model(target_path, self.config.dtype_on(self.info.device), self.config.device)
        check_drafter_tokenizer(target_path, resolve_model(self.config.drafter), int(model.config.vocab_size))
        self._sessions = VerifierSessions(Verifier(model, self._cost_profile(target_path)), self.config.max_sessions_per_replica)

    def _cost_profile(self, target_path: Path) -> CostProfile | None:
        """The configured cost profile, else the one measured on this replica's device (None if none was)."""
        config = self.config
        if config.cost_profile:
            return CostProfile.load(config.cost_profile)
        return find_profile(self.info.device, target_path.name, config.drafter_profile_key(self.info.device), config.dtype_on(self.info.device))

    def on_sessions_changed(self) -> None:
        super().on_sessions_changed()
        self._metrics.record(self.occupancy, self._last_batch)

    async def open(self, session_id: str, token_ids: list[int], params: SamplingParams) -> SessionInfo:
        """Prefill a session (all of ``token_ids`` but the last, which is the first root)."""
        await self.open_session(session_id, token_ids, params)
        self._opened += 1
        return self.info

    async def verify(self, session_id: str, draft: DraftOutput) -> StepOutput:
        """Verify and commit one drafted tree of ``session_id`` (batched with other sessions)."""
        self.ensure_loaded()
        started = time.perf_counter()
        result = await self.batcher.submit((session_id, draft))
        self.timings.record(time.perf_counter() - started, result.verify_s)
        return result

    async def _verify_batch(self, calls: list[tuple[str, DraftOutput]]) -> list[StepOutput | Exception]:
        return await self.run(self._verify_now, [sid for sid, _ in calls], [draft for _, draft in calls])

    def _verify_now(self, session_ids: list[str], drafts: list[DraftOutput]) -> list[StepOutput | Exception]:
        live = set(self.sessions.sessions())
        trees = {sid: d.tree.tree for sid, d in zip(session_ids, drafts) if sid in live}
        started = time.perf_counter()
        paths = self.sessions.verify(trees) if trees else {}
        verify_s = time.perf_counter() - started
        self._last_batch = len(trees)
        self.timings.forwards += 1 if trees else 0
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
        return {**self.debug_sessions(), "last_batch_size": self._last_batch, "sessions_opened": self._opened}

    async def debug_drop_sessions(self) -> list[str]:
        """Forget every session, as a restarted replica would (tests of the re-open path)."""
        dropped = await self.run(self.sessions.sessions)
        await self.run(self.sessions.close, dropped)
        self.on_sessions_changed()
        return dropped
