"""RequestBatcher: concurrent requests for any deltas become one batch call (no Ray needed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from orchestrator.serving.batching import BatchingError, RequestBatcher


def test_requests_are_batched_up_to_the_size_in_arrival_order():
    calls = []

    def run(items):
        calls.append(list(items))
        return [f"{item}!" for item in items]

    async def main():
        # A wait far longer than the test: batches are cut by size only, so the split is deterministic.
        b = RequestBatcher(run, max_batch_size=3, wait_s=60.0)
        return await asyncio.gather(*(b.submit(f"r{i}") for i in range(6)))

    assert asyncio.run(main()) == [f"r{i}!" for i in range(6)]
    assert calls == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]


def test_a_lone_request_runs_after_the_wait():
    async def main():
        b = RequestBatcher(lambda items: [len(items)] * len(items), max_batch_size=8, wait_s=0.0)
        return await b.submit("only")

    assert asyncio.run(main()) == 1


def test_a_failing_batch_fails_its_requests_only_and_the_next_batch_runs():
    def run(items):
        if "bad" in items:
            raise ValueError("batch with bad")
        return items

    async def main():
        b = RequestBatcher(run, max_batch_size=2, wait_s=60.0)
        first = await asyncio.gather(b.submit("bad"), b.submit("x"), return_exceptions=True)
        second = await asyncio.gather(b.submit("y"), b.submit("z"))
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, ValueError) and "bad" in str(r) for r in first)
    assert second == ["y", "z"]


def test_wrong_answer_count_and_cancelled_requests():
    seen = []
    release = threading.Event()

    def run(items):
        seen.append(list(items))
        release.wait(5)
        return items[:-1] if "short" in items else items

    async def main():
        b = RequestBatcher(run, max_batch_size=2, wait_s=60.0)
        first = asyncio.gather(b.submit("a"), b.submit("b"))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(b.submit("cancelled"))
        kept = asyncio.ensure_future(b.submit("c"))
        await asyncio.sleep(0)
        gone.cancel()  # cancelled while the first batch runs: left out of the next one
        tail = asyncio.ensure_future(b.submit("d"))
        release.set()
        await first
        later = await asyncio.gather(kept, tail)
        short = await asyncio.gather(b.submit("short"), b.submit("e"), return_exceptions=True)
        return later, short

    later, short = asyncio.run(main())
    assert later == ["c", "d"]
    assert seen[:2] == [["a", "b"], ["c", "d"]]  # the cancelled request left no gap in the batch
    assert all(isinstance(r, BatchingError) and "answered 1 of 2" in str(r) for r in short)


@pytest.mark.parametrize("size,wait,field", [(0, 0.1, "max_batch_size"), (4, -1, "wait")])
def test_bad_settings_are_refused(size, wait, field):
    with pytest.raises(BatchingError, match=field):
        RequestBatcher(lambda items: items, max_batch_size=size, wait_s=wait)
