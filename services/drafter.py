"""The Drafter deployment: drafter-model sessions, draft steps batched and planned together.

Per session: ``open`` (prefill), ``draft`` (catch up on the tokens committed
since the last step, then grow the step's tree), ``close``. Concurrent
sessions' ``draft`` calls are batched (``services.batcher.StepBatcher``); sessions that
verify on the same verifier replica are drafted in one ``DrafterSessions.draft``
call, sized together under that replica's cost context.

The cost context comes from the Planner, cached per (verifier replica, drafter
batch, context bucket) for ``plan_refresh_s``: a stale entry is used while a
background call refreshes it, so a step waits for the planner only the first
time a key is seen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from cast_core.drafter import Drafter
from cast_core.models import load_drafter, load_tokenizer, resolve_model
from cast_core.policy import CostContext, TreePolicy, make_policy
from cast_core.sessions import DrafterSessions, SessionNotFound
from services.config import AppConfig
from services.messages import DraftOutput, SessionInfo, TreePayload
from services.replica import ModelReplica

logger = logging.getLogger(__name__)

PlanKey = tuple[str, int, int]  # (verifier replica id, drafter batch, context bucket)


def context_bucket(tokens: int) -> int:
    """Round a context length up to a power of two (>= 64): cost tables vary slowly in it."""
    bucket = 64
    while bucket < tokens:
        bucket *= 2
    return bucket


@dataclass
class _CachedPlan:
    ctx: CostContext | None
    fetched_at: float
    refreshing: bool = False


class DrafterReplica(ModelReplica[DrafterSessions]):
    """One drafter replica (deployed as ``Drafter``)."""

    role = "drafter"

    async def __init__(self, config: AppConfig, planner: DeploymentHandle) -> None:
        super().__init__(config, config.drafter_batching, self._draft_batch)
        self._planner = planner
        self._policy: TreePolicy = make_policy(config.policy, config.static, config.cast)
        self._context: dict[str, int] = {}
        self._plans: dict[PlanKey, _CachedPlan] = {}
        await self.load(self._load)

    def _load(self) -> None:
        # Only the drafter's own files: the Verifier checks that this tokenizer is the target's and
        # that the target accepts all its ids, so drafting within the tokenizer's ids needs no target.
        drafter_path = resolve_model(self.config.drafter)
        vocab_size = len(load_tokenizer(drafter_path))
        quantization = self.config.drafter_quantization_on(self.info.device)
        model, _ = load_drafter(drafter_path, self.config.dtype_on(self.info.device), self.config.device, quantization)
        self._sessions = DrafterSessions(Drafter(model, vocab_size, self.config.draft_vocab), self._policy, self.config.max_sessions_per_replica)

    def on_sessions_changed(self) -> None:
        super().on_sessions_changed()
        live = set(self.sessions.sessions())
        for sid in [s for s in self._context if s not in live]:
            del self._context[sid]

    async def open(self, session_id: str, token_ids: list[int], tokens_left: int | None = None) -> SessionInfo:
        """Open a session (all of ``token_ids`` but the last, the first step's root, wait as its catch-up)
        that may still generate ``tokens_left`` tokens (None: unbounded; the speedup gate weighs the catch-up against it)."""
        await self.open_session(session_id, token_ids, tokens_left)
        self._context[session_id] = len(token_ids) - 1  # cached; the root arrives as the first pending token
        return self.info

    async def draft(self, session_id: str, pending: list[int], verifier_replica: str | None, last_step_s: float | None = None) -> DraftOutput:
        """Catch up on ``pending`` (ending with the root) and draft this step's tree.

        ``verifier_replica``: the replica that will verify it (whose occupancy sizes the tree);
        ``last_step_s``: the draft and verify seconds of the session's last step (``StepOutput``), which
        the speedup gate judges that step by (None: the wall time since the last drafting call).
        """
        self.ensure_loaded()
        started = time.perf_counter()
        result = await self.batcher.submit((session_id, pending, verifier_replica, last_step_s))
        self.timings.record(time.perf_counter() - started, result.draft_s)
        return result

    async def _draft_batch(self, calls: list[tuple[str, list[int], str | None, float | None]]) -> list[DraftOutput | Exception]:
        session_ids, pendings, verifiers = [c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls]
        step_s = {c[0]: c[3] for c in calls if c[3] is not None}
        results: list[DraftOutput | Exception | None] = [None] * len(session_ids)
        live = set(self.sessions.sessions())
        groups: dict[str, list[int]] = {}
        for i, (sid, verifier) in enumerate(zip(session_ids, verifiers)):
            if sid in live:
                groups.setdefault(verifier or "", []).append(i)
            else:
                results[i] = SessionNotFound(sid)
        for verifier, members in groups.items():
            context = max(self._context.get(session_ids[i], 0) + len(pendings[i]) for i in members)
            planning = time.perf_counter()
            ctx = await self._plan(verifier or None, context)
            self.timings.plan_s += (time.perf_counter() - planning) * len(members)
            pending = {session_ids[i]: pendings[i] for i in members}
            try:
                drafts, draft_s = await self.run(self._draft_now, pending, ctx, step_s)
            except SessionNotFound as err:  # evicted between the check and the forward
                for i in members:
                    results[i] = err
                continue
            self.timings.forwards += 1
            for i in members:
                sid = session_ids[i]
                tree, result = drafts[sid]
                self._context[sid] = self._context.get(sid, 0) + len(pendings[i])
                results[i] = DraftOutput(
                    tree=TreePayload(tree),
                    nodes_drafted=result.nodes_drafted,
                    draft_s=draft_s,
                    plan_batch=ctx.batch_size if ctx is not None else 0,
                )
        return results  # type: ignore[return-value]

    def _draft_now(self, pending: dict[str, list[int]], ctx: CostContext | None, step_s: dict[str, float]):
        started = time.perf_counter()
        drafts = self.sessions.draft(pending, ctx, step_s)
        return drafts, time.perf_counter() - started

    async def _plan(self, verifier: str | None, context: int) -> CostContext | None:
        """The cost context for a step verified on ``verifier`` (cached, refreshed in the background)."""
        if not self._policy.needs_costs:
            return None
        key = (verifier or "", self.occupancy, context_bucket(context))
        cached = self._plans.get(key)
        now = time.monotonic()
        if cached is None:
            cached = _CachedPlan(await self._fetch_plan(key), time.monotonic())
            self._plans[key] = cached
        elif now - cached.fetched_at > self.config.plan_refresh_s and not cached.refreshing:
            cached.refreshing = True
            self.spawn(self._refresh(key, cached))
        return cached.ctx

    async def _fetch_plan(self, key: PlanKey) -> CostContext | None:
        verifier, batch, bucket = key
        return await self._planner.plan.remote(verifier or None, self.info.device, batch, bucket)

    async def _refresh(self, key: PlanKey, cached: _CachedPlan) -> None:
        try:
            cached.ctx = await self._fetch_plan(key)
            cached.fetched_at = time.monotonic()
        except Exception as err:  # keep the last plan; try again on the next step
            logger.warning("drafter %s: plan refresh failed: %s", self.replica_id, err)
        finally:
            cached.refreshing = False

    def record_routing_stats(self) -> dict[str, int | str]:
        """Published to request routers (``RunningReplica.routing_stats``)."""
        return {"sessions": self.occupancy, "device": self.info.device}

    async def debug_state(self) -> dict[str, object]:
        """Sessions held and DraftTree deserialisations in this process (tests, debugging)."""
        return {**self.debug_sessions(), "plans_cached": len(self._plans)}
