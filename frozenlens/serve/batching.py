"""Admission control and request batching for the feature server.

:class:`Admission` bounds the images waiting for the backbone: a request that
would push the count past the limit is refused at once (HTTP 429) instead of
queueing without end. :class:`Batcher` merges waiting jobs from concurrent
requests into one backbone pass (up to ``max_batch_images``, waiting at most
``max_wait_s`` for company) and runs it on a worker thread, so the event loop
keeps accepting, refusing and answering requests while the backbone runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Generic, Sequence, TypeVar

from frozenlens.serve.engine import Job, RequestError

R = TypeVar("R")


class Admission:
    """Counts images admitted but not yet answered; refuses past ``max_images``."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.pending = 0

    def enter(self, count: int) -> None:
        """Admit ``count`` images, or raise a 429 :class:`RequestError` when the queue is full."""
        if self.pending + count > self.max_images:
            raise RequestError(429, f"the server is busy ({self.pending} images queued, limit "
                                    f"{self.max_images}); retry after a short wait")
        self.pending += count

    def leave(self, count: int) -> None:
        """Release ``count`` images once their request is answered (or failed)."""
        self.pending -= count


class Batcher(Generic[R]):
    """Runs ``run(jobs)`` for batches of jobs collected from concurrent callers.

    Args:
        run: computes one result per job, in order (called on a worker thread).
        max_batch_images: images per backbone pass; a job is never split.
        max_wait_s: how long the first job of a batch waits for others.
    """

    def __init__(self, run: Callable[[Sequence[Job]], list[R]], *, max_batch_images: int = 32,
                 max_wait_s: float = 0.005):
        self._run = run
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[R]] | None] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="frozenlens-backbone")
        self._worker: asyncio.Task[None] | None = None
        self._held: tuple[Job, asyncio.Future[R]] | None = None
        self.passes = 0

    async def start(self) -> None:
        """Start the worker (call from the event loop that will submit)."""
        self._worker = asyncio.create_task(self._work(), name="frozenlens-batcher")

    async def submit(self, job: Job) -> R:
        """Queue ``job`` and wait for its result."""
        if self._worker is None or self._worker.done():
            raise RequestError(503, "the server is shutting down; retry on another replica or later")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def stop(self) -> None:
        """Finish every queued job, then stop the worker and its thread."""
        if self._worker is not None and not self._worker.done():
            await self._queue.put(None)
            await self._worker
        self._executor.shutdown(wait=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                return
            jobs = [job for job, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as err:  # the callers get the error; the worker keeps serving
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.passes += 1
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def _collect(self) -> list[tuple[Job, asyncio.Future[R]]]:
        """The next batch: the first waiting job plus whatever fits before ``max_wait_s``.

        Returns an empty list once the stop sentinel is reached and nothing is left.
        """
        first = self._held or await self._queue.get()
        self._held = None
        if first is None:
            return []
        batch, images = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while images < self.max_batch_images:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                    self._queue.get(), timeout)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is None:  # stop: answer this batch first, see the sentinel again next time
                await self._queue.put(None)
                break
            if images + len(item[0]) > self.max_batch_images:
                self._held = item
                break
            batch.append(item)
            images += len(item[0])
        return batch
