"""Per-session step calls batched into one model call, each batch formed when the previous one is done.

A drafter or verifier replica steps every live session in one forward. Serve's
``@serve.batch`` forms a batch from the calls that arrive within its wait after
the first, even while an earlier batch still runs, and queues it: with steps
arriving spread out over a forward's time, each waits as a batch of its own. At
concurrency 8 on the 2-core AMD EPYC, drafter and verifier forwards stepped 1.14
and 1.15 sessions on average, and the HTTP path ran 0.15x the in-process engine.

Here a batch is formed only once the worker is free, from every call waiting
then (at most ``max_batch_size``). A batch of every live session (``expected``)
runs at once; while fewer wait, it waits for the rest up to

    w = min(wait_s, F)        F: mean duration of the recent batches (EMA)

A step left out runs in a batch of its own later, which costs about a forward,
so waiting up to one forward's time loses at most what not waiting would
(the ski-rental bound), and lets sessions split into cohorts, one drafting
while the other verifies, join up again: at concurrency 8 on the 2-core AMD
EPYC, with a 10 ms wait, batches formed this way stepped 3.0 (drafter) and
3.8 (verifier) sessions on average. Waiting for every live session whatever
it takes is worse: two cohorts each wait at one replica for the other, held at
the other replica; with a fixed 1 s wait, HTTP ran 0.11x / 0.17x in-process at
concurrency 4 / 8 (``bench/results/serving_fixed_wait_1s.json``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

#: weight of the latest batch's duration in ``F``
FORWARD_EMA = 0.25

Item = TypeVar("Item")
Result = TypeVar("Result")


class StepBatcher(Generic[Item, Result]):
    """Collects ``submit`` calls into batches for ``run_batch``, one batch at a time.

    ``run_batch(items)`` returns one result per item, in order; an ``Exception``
    in place of a result is raised to that item's caller alone, and an exception
    ``run_batch`` raises goes to every caller of the batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
        max_batch_size: int,
        wait_s: float,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0; got {wait_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._expected = 1
        self._forward_s = 0.0
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def expected(self) -> int:
        """Calls a batch waits for: ``min(max_batch_size, sessions)`` as last set by ``expect`` (at least 1)."""
        return self._expected

    @property
    def wait_limit_s(self) -> float:
        """``w = min(wait_s, F)``: longest wait for missing steps once the worker is free (0 before any batch ran)."""
        return min(self.wait_s, self._forward_s)

    def expect(self, sessions: int) -> None:
        """Set the calls a batch waits for to the live sessions (within ``[1, max_batch_size]``)."""
        self._expected = max(1, min(self.max_batch_size, sessions))
        self._changed.set()

    async def submit(self, item: Item) -> Result:
        """Run ``item`` in the next batch formed; its result, or its exception raised."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve())
        return await future  # a cancelled caller cancels its future: the batch drops it

    def _live(self) -> int:
        self._waiting = [(item, future) for item, future in self._waiting if not future.cancelled()]
        return len(self._waiting)

    async def _until(self, ready: Callable[[], bool], timeout_s: float | None) -> None:
        """Return once ``ready()`` holds (checked at every submit and ``expect``) or ``timeout_s`` passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ready():
            self._changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _serve(self) -> None:
        while True:
            await self._until(lambda: self._live() > 0, None)
            await self._until(lambda: self._live() >= self._expected, self.wait_limit_s)
            batch = self._waiting[: self.max_batch_size]
            self._waiting = self._waiting[len(batch) :]
            if not batch:
                continue
            started = time.monotonic()
            try:
                results = await self._run_batch([item for item, _ in batch])
            except BaseException as err:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err if isinstance(err, Exception) else RuntimeError(f"batch interrupted: {err!r}"))
                if not isinstance(err, Exception):
                    raise
                continue
            took = time.monotonic() - started
            self._forward_s = took if not self._forward_s else self._forward_s + FORWARD_EMA * (took - self._forward_s)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
