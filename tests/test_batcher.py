"""services.batcher.StepBatcher: batches formed when the worker is free, from every step waiting then."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.batcher import StepBatcher


class Worker:
    """A batch step that takes ``step_s`` and records the batches it ran."""

    def __init__(self, step_s: float, fail: set[str] | None = None, raise_on: str | None = None) -> None:
        self.step_s, self.fail, self.raise_on = step_s, fail or set(), raise_on
        self.batches: list[list[str]] = []

    async def __call__(self, items: list[str]) -> list[str | Exception]:
        self.batches.append(list(items))
        await asyncio.sleep(self.step_s)
        if self.raise_on in items:
            raise RuntimeError(f"forward failed on {self.raise_on}")
        return [ValueError(f"bad {i}") if i in self.fail else i.upper() for i in items]


async def _submit_later(batcher: StepBatcher, item: str, delay_s: float):
    await asyncio.sleep(delay_s)
    return await batcher.submit(item)


def test_steps_arriving_while_a_batch_runs_form_one_batch_when_it_is_done():
    async def scenario():
        worker = Worker(step_s=0.3)
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=0.01)
        batcher.expect(4)
        # "a" runs alone (nothing else within its wait); b, c, d arrive 50 ms apart while it runs
        results = await asyncio.gather(*(_submit_later(batcher, x, 0.05 * i) for i, x in enumerate("abcd")))
        return worker.batches, results

    batches, results = asyncio.run(scenario())
    assert results == ["A", "B", "C", "D"]
    assert batches == [["a"], ["b", "c", "d"]]


def test_a_batch_of_every_live_session_runs_without_waiting():
    async def scenario():
        worker = Worker(step_s=0.0)
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=30.0)
        batcher.expect(3)
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in "xyz")), 5.0), worker.batches

    results, batches = asyncio.run(scenario())
    assert results == ["X", "Y", "Z"] and batches == [["x", "y", "z"]]


def test_fewer_live_sessions_release_a_waiting_batch():
    async def scenario():
        worker = Worker(step_s=0.5)
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=30.0)
        batcher.expect(3)
        await batcher.submit("w")  # a batch's time measured: later batches wait up to 0.5 s
        pending = asyncio.gather(batcher.submit("p"), batcher.submit("q"))
        await asyncio.sleep(0.05)
        assert worker.batches == [["w"]]  # waiting for the third session
        released = time.monotonic()
        batcher.expect(2)  # it closed
        results = await asyncio.wait_for(pending, 5.0)
        return results, worker.batches, time.monotonic() - released

    results, batches, took_s = asyncio.run(scenario())
    assert results == ["P", "Q"] and batches == [["w"], ["p", "q"]]
    assert took_s < 0.5 + 0.3  # the batch's own 0.5 s, not a further wait


def test_a_batch_holds_at_most_max_batch_size_steps():
    async def scenario():
        worker = Worker(step_s=0.0)
        batcher = StepBatcher(worker, max_batch_size=2, wait_s=0.0)
        batcher.expect(5)
        assert batcher.expected == 2
        return await asyncio.gather(*(batcher.submit(x) for x in "abcde")), worker.batches

    results, batches = asyncio.run(scenario())
    assert results == list("ABCDE") and batches == [["a", "b"], ["c", "d"], ["e"]]


def test_one_steps_error_reaches_its_caller_alone_and_a_failed_batch_reaches_all_of_its_callers():
    async def scenario():
        worker = Worker(step_s=0.0, fail={"b"}, raise_on="x")
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=0.0)
        batcher.expect(2)
        first = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
        second = await asyncio.gather(batcher.submit("x"), batcher.submit("y"), return_exceptions=True)
        third = await batcher.submit("c")  # the batcher goes on after a failed batch
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first[0] == "A" and isinstance(first[1], ValueError) and "bad b" in str(first[1])
    assert all(isinstance(r, RuntimeError) and "forward failed on x" in str(r) for r in second)
    assert third == "C"


def test_a_cancelled_step_is_left_out_of_the_batch():
    async def scenario():
        worker = Worker(step_s=0.2)
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=0.0)
        batcher.expect(3)
        running = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.05)  # "a" runs; "b" and "c" wait for the worker
        gone = asyncio.ensure_future(batcher.submit("b"))
        kept = asyncio.ensure_future(batcher.submit("c"))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await running, await kept, worker.batches

    first, kept, batches = asyncio.run(scenario())
    assert (first, kept) == ("A", "C") and batches == [["a"], ["c"]]


@pytest.mark.parametrize("field, kwargs", [("max_batch_size", {"max_batch_size": 0, "wait_s": 0.0}), ("wait_s", {"max_batch_size": 1, "wait_s": -1.0})])
def test_bad_limits_are_refused_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        StepBatcher(Worker(0.0), **kwargs)


def test_a_short_batch_waits_for_missing_steps_as_long_as_a_recent_batch_took():
    async def scenario():
        worker = Worker(step_s=0.2)
        batcher = StepBatcher(worker, max_batch_size=16, wait_s=10.0)
        batcher.expect(2)
        assert batcher.wait_limit_s == 0.0  # nothing measured yet: no wait
        await batcher.submit("a")
        assert 0.15 < batcher.wait_limit_s < 1.0
        await asyncio.gather(batcher.submit("b"), _submit_later(batcher, "c", 0.1))  # within a batch's time: joins
        await asyncio.gather(batcher.submit("d"), _submit_later(batcher, "e", 0.6))  # beyond it: runs alone
        return worker.batches

    assert asyncio.run(scenario()) == [["a"], ["b", "c"], ["d"], ["e"]]
