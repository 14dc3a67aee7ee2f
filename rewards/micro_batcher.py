"""The micro-batcher of the scoring server: concurrent requests' items pooled into model batches.

A micro-batcher gathers the items of concurrent requests into model batches of up to `batch_size`
(waiting at most `max_wait_ms` for a batch to fill) and runs the batches one at a time in a single
worker thread, since the model must not be called from two threads at once. Each request gets its own
results back in its own order. Each batch deals its places round-robin over the waiting requests, so a
huge request shares the model with small ones rather than starving them; a request whose client has
gone is cancelled and its remaining items are not scored; and when a batch fails, its requests are
scored again one at a time, so only the request that fails gets a 500 (its detail goes to the log,
never to the client).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

log = logging.getLogger("align.serve_rm")


class ScoringError(RuntimeError):
    """Scoring a request failed: a server fault (500), not bad input; or the server is stopping (503).
    The message is what the client sees: the cause goes to the log only."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class _Job:
    """One request's items, and how far they have got."""

    def __init__(self, items: list, future: asyncio.Future, arrived: float):
        self.items = items
        self.future = future
        self.arrived = arrived
        self.results: list[float | None] = [None] * len(items)
        self.taken = 0  # items handed to a batch
        self.scored = 0


class MicroBatcher:
    """Pools the items of concurrent `score` calls into batches of up to `batch_size` for `score_fn`,
    run in `worker` (a one-thread executor shared by every batcher of the model)."""

    def __init__(self, score_fn: Callable[[list], list[float]], worker: ThreadPoolExecutor, batch_size: int,
                 max_wait_ms: float):
        self._score_fn = score_fn
        self._worker = worker
        self._batch_size = batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()  # None: stop once drained
        self._pending: deque[_Job] = deque()  # jobs with items not yet handed to a batch
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Score everything already submitted, then end."""
        self._closing = True
        self._queue.put_nowait(None)
        await self._task

    async def score(self, items: list) -> list[float]:
        """The items' results in order. Cancelling the caller (its client has gone) cancels the job:
        its items not yet in a batch are never scored."""
        if not items:
            return []
        if self._closing:
            raise ScoringError("the server is shutting down: retry on another replica", status=503)
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        stopping = False
        while self._pending or not stopping:
            if not self._pending:
                job = await self._queue.get()
                if job is None:
                    break
                self._pending.append(job)
            if not stopping:  # once stopping, nothing more can arrive: score what is left at once
                stopping = await self._fill()
            await self._score(self._take())

    async def _fill(self) -> bool:
        """Take every queued job, then wait for more until a full batch is open or the oldest job has
        waited `max_wait_ms`. Returns True when the stop marker was taken."""
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].arrived + self._max_wait_s
        while True:
            while not self._queue.empty():  # jobs that arrived during the last batch join this one
                job = self._queue.get_nowait()
                if job is None:
                    return True
                self._pending.append(job)
            if self._open_items() >= self._batch_size:
                return False
            try:
                job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                return False
            if job is None:
                return True
            self._pending.append(job)

    def _open_items(self) -> int:
        return sum(len(job.items) - job.taken for job in self._pending if not job.future.done())

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to `batch_size` items as (job, start, end) slices, the places dealt one at a time
        round-robin over the waiting jobs, oldest first: a large request is split across batches and
        every batch has room for the requests that arrived meanwhile."""
        # a done job failed in an earlier batch, or was abandoned by its client
        self._pending = deque(job for job in self._pending if not job.future.done())
        counts, room = dict.fromkeys(self._pending, 0), self._batch_size
        while room:
            dealt = room
            for job in self._pending:
                if room and job.taken + counts[job] < len(job.items):
                    counts[job] += 1
                    room -= 1
            if dealt == room:  # every job is in full
                break
        parts = [(job, job.taken, job.taken + count) for job, count in counts.items() if count]
        for job, _, end in parts:
            job.taken = end
        self._pending = deque(job for job in self._pending if job.taken < len(job.items))
        return parts

    async def _score(self, parts: list[tuple[_Job, int, int]]) -> None:
        """Score a batch; if it fails, score its requests one at a time, so that only the one whose
        items fail gets an error."""
        if not parts:
            return
        try:
            rewards = await self._run_model([item for job, start, end in parts for item in job.items[start:end]])
        except Exception:
            if len(parts) == 1:
                return self._fail(parts[0][0])
            log.warning("a batch of %d items from %d requests failed: scoring each request alone",
                        sum(end - start for _, start, end in parts), len(parts), exc_info=True)
            for part in parts:
                if not part[0].future.done():
                    await self._score([part])
            return
        offset = 0
        for job, start, end in parts:
            job.results[start:end] = rewards[offset:offset + end - start]
            offset += end - start
            job.scored += end - start
            if job.scored == len(job.items) and not job.future.done():
                job.future.set_result(job.results)

    async def _run_model(self, items: list) -> list:
        rewards = await asyncio.get_running_loop().run_in_executor(self._worker, self._score_fn, items)
        # a float per item (a reward), or a tuple of floats (a preference model's score, uncertainty)
        rewards = [tuple(map(float, r)) if isinstance(r, (tuple, list)) else float(r) for r in rewards]
        if len(rewards) != len(items):
            raise ValueError(f"the model returned {len(rewards)} rewards for {len(items)} items")
        if not all(math.isfinite(x) for r in rewards for x in (r if isinstance(r, tuple) else (r,))):
            raise ValueError(f"the model returned a non-finite reward: {rewards}")
        return rewards

    @staticmethod
    def _fail(job: _Job) -> None:
        log.exception("scoring a request's %d items failed", len(job.items))
        if not job.future.done():
            job.future.set_exception(ScoringError("scoring failed: the reward model raised an error on this "
                                                  "request's items (details in the server log)"))
