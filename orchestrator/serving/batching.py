"""Request batching for a Serve replica: concurrent requests become one call of a batch function,
whatever task delta each names.

Ray Serve's ``@serve.batch`` splits every batch by multiplexed model id, so a batch never holds two
deltas; the mixed-task forward (shpeft_core.mixed) runs any mix in one pass, so the replica batches
with this instead.

Invariants: a batch holds at most ``max_batch_size`` requests, in arrival order; it is cut when it is
full or ``wait_s`` after its first request arrived; one batch runs at a time (in a worker thread, so
the event loop keeps accepting requests), and the next one is gathered meanwhile; a request cancelled
before its batch runs is left out; an exception from the batch function fails every request of that
batch and no other.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

__all__ = ["BatchingError", "RequestBatcher"]


class BatchingError(ValueError):
    """Batching settings that cannot work (named), or a batch function that answered the wrong count."""


class RequestBatcher:
    """``await submit(item)`` returns ``run(items)[i]`` for this item's place i in its batch."""

    def __init__(self, run: Callable[[list], Sequence[Any]], *, max_batch_size: int, wait_s: float):
        if max_batch_size < 1:
            raise BatchingError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if wait_s < 0:
            raise BatchingError(f"batch wait must be >= 0 s, got {wait_s}")
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        future = loop.create_future()
        self._pending.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve())
        return await future

    def _live(self) -> int:
        self._pending = [(item, f) for item, f in self._pending if not f.cancelled()]
        return len(self._pending)

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.wait_s
        while self._live() < self.max_batch_size:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
        return batch

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise BatchingError(f"the batch function answered {len(results)} of {len(batch)} requests")
            except Exception as exc:  # the batch's requests get the error; the loop serves the next batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
