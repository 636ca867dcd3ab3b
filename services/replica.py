"""What the drafter and verifier replicas share: one model worker thread, loading, sessions, health, eviction.

``cast_core.sessions`` objects are single-threaded, so every call that touches
them runs on the replica's one worker thread (``ModelReplica.run``); the
replica's event loop stays free for batching, health checks and routing stats.
Loading happens on that thread too; a failure is kept and reported by
``check_health`` (the replica stays up, answers every call with the reason,
and Serve marks it unhealthy).

Sessions (``cast_core.sessions.DrafterSessions`` / ``VerifierSessions``) are
opened within ``max_sessions_per_replica``: an open beyond it raises
``ReplicaFull``, a declared overload (HTTP 503 + Retry-After, gRPC
UNAVAILABLE) that leaves the replica and its other sessions untouched. The
replica's ``StepBatcher`` (``services.batcher``) waits for as many calls as
there are live sessions (capped by its ``BatchingConfig``), so a step runs as
soon as every live session has sent it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

import ray
import torch
from ray import serve

from cast_core.cost import device_name
from cast_core.sessions import DrafterSessions, SessionNotFound, VerifierSessions
from services.batcher import StepBatcher
from services.config import AppConfig, BatchingConfig
from services.errors import Unavailable
from services.messages import SessionInfo, tree_unpickle_count

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sessions = TypeVar("Sessions", DrafterSessions, VerifierSessions)


class ReplicaFull(Unavailable):
    """The replica holds ``max_sessions_per_replica`` sessions: HTTP 503 + Retry-After, gRPC UNAVAILABLE."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        # crosses the actor boundary pickled: rebuild from both arguments
        return type(self), (self.message, self.retry_after_s)


@dataclass
class StepTimings:
    """Cumulative step timings of a replica (``debug_state``; ``bench.serving`` splits the Router's step with them).

    Attributes:
        calls: steps served (``draft`` or ``verify`` calls).
        forwards: batched model calls that served them (``calls / forwards``: sessions a forward steps, on average).
        busy_s: from each call's arrival at the replica to its answer.
        compute_s: the model forwards of those steps.
        plan_s: waiting for the Planner's cost context (drafter), per step.
        open_s: session opens (prefill), from arrival to answer.
    """

    calls: int = 0
    forwards: int = 0
    busy_s: float = 0.0
    compute_s: float = 0.0
    plan_s: float = 0.0
    open_s: float = 0.0

    def record(self, busy_s: float, compute_s: float) -> None:
        self.calls += 1
        self.busy_s += busy_s
        self.compute_s += compute_s


class ModelReplica(Generic[Sessions]):
    """Base of a replica holding per-session model state (``Sessions``) on one worker thread."""

    role = "model"
    #: closed session ids remembered, so an ``open`` that arrives after its ``close`` is refused
    CLOSED_MEMORY = 4096

    def __init__(self, config: AppConfig, batching: BatchingConfig, run_batch: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        """``run_batch``: the replica's step over a batch of calls (``StepBatcher``), sized by ``batching`` and the live sessions."""
        self.config = config
        self._sessions: Sessions | None = None
        self.batcher: StepBatcher[Any, Any] = StepBatcher(run_batch, batching.max_batch_size, batching.batch_wait_timeout_s)
        self.timings = StepTimings()
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cast-{self.role}")
        self._load_error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.info = SessionInfo(replica_id=self.replica_id, node_id=ray.get_runtime_context().get_node_id(), device="")

    async def load(self, loader: Callable[[], None]) -> None:
        """Run ``loader`` on the worker thread (threads set first); keep its error for health checks."""
        started = time.perf_counter()
        try:
            # the CPU device kind names the thread count (cost profiles are keyed by it): set threads first
            self.info.device = await self.run(self._set_threads)
            await self.run(loader)
        except Exception as err:  # reported by check_health and every call
            self._load_error = f"{self.role} replica failed to load its model: {type(err).__name__}: {err}"
            logger.exception(self._load_error)
            return
        logger.info("%s replica %s loaded in %.1fs on %s", self.role, self.replica_id, time.perf_counter() - started, self.info.device)
        self.spawn(self._evict_loop())

    def forget_session(self, session_id: str) -> None:
        """Remember that ``session_id`` was closed (its request is over)."""
        self._closed[session_id] = None
        while len(self._closed) > self.CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def refuse_if_closed(self, session_id: str) -> None:
        """Raise ``SessionNotFound`` for a session already closed.

        Open and close are separate requests: when a request is cancelled while
        its (re-)open is in flight, the close can reach the replica first. The
        late open must not resurrect state nobody will ever close.
        """
        if session_id in self._closed:
            raise SessionNotFound(f"{session_id} was closed")

    def _set_threads(self) -> str:
        """Set torch's threads; returns the device kind (``cast_core.cost.device_name``)."""
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        return device_name(self.config.device)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def spawn(self, coro: Any) -> None:
        """Keep a background task alive for the replica's lifetime."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ensure_loaded(self) -> None:
        if self._load_error is not None:
            raise RuntimeError(self._load_error)

    async def check_health(self) -> None:
        """Serve health check: fails with the load error, if any."""
        self.ensure_loaded()

    @property
    def sessions(self) -> Sessions:
        """The loaded sessions object (raises the load error if loading failed)."""
        self.ensure_loaded()
        assert self._sessions is not None
        return self._sessions

    @property
    def occupancy(self) -> int:
        """Live sessions on this replica (0 while loading)."""
        return self._sessions.occupancy if self._sessions is not None else 0

    async def open_session(self, session_id: str, *args: Any) -> None:
        """``sessions.open(session_id, *args)`` within the session limit (``ReplicaFull`` beyond it)."""
        self.refuse_if_closed(session_id)
        started = time.perf_counter()
        await self.run(self._open_within_limit, session_id, *args)
        self.timings.open_s += time.perf_counter() - started
        self.on_sessions_changed()

    def _open_within_limit(self, session_id: str, *args: Any) -> None:
        # on the worker thread, so concurrent opens see each other; checked before the prefill's cost
        sessions = self.sessions
        limit = self.config.max_sessions_per_replica
        if sessions.occupancy >= limit and session_id not in sessions.sessions():
            retry = self.config.admission.retry_after_s
            raise ReplicaFull(f"server overloaded: a {self.role} replica holds its maximum of {limit} sessions; retry after {retry}s", retry)
        sessions.open(session_id, *args)

    async def close(self, session_id: str) -> None:
        """Free a session's state (unknown ids are ignored); a later open of it is refused."""
        self.forget_session(session_id)
        await self.run(self.sessions.close, [session_id])
        self.on_sessions_changed()

    def evict_idle(self, older_than_s: float) -> list[str]:
        """Drop sessions idle for ``older_than_s`` (worker thread)."""
        return self.sessions.evict_idle(older_than_s)

    def on_sessions_changed(self) -> None:
        """Called on the event loop after sessions were opened, closed or evicted: resize the batch."""
        self.batcher.expect(self.occupancy)

    def debug_sessions(self) -> dict[str, object]:
        """What every replica's ``debug_state`` reports: identity, live sessions, step timings."""
        return {
            "replica_id": self.replica_id,
            "node_id": self.info.node_id,
            "sessions": self._sessions.sessions() if self._sessions is not None else [],
            "tree_unpickles": tree_unpickle_count(),
            "timings": asdict(self.timings),
        }

    async def _evict_loop(self) -> None:
        timeout = self.config.session_idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 30.0))
            stale = await self.run(self.evict_idle, timeout)
            if stale:
                logger.info("%s replica %s evicted idle sessions %s", self.role, self.replica_id, stale)
                self.on_sessions_changed()
