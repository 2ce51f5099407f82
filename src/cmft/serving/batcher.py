"""Dynamic batching for `cmft serve`: requests queue up and their texts' model rows (units) are run together.

A batch is gathered until its rows hold `max_batch_tokens` tokens or the oldest request has waited `max_wait_ms`;
its rows are then length-sorted and cut into forward passes of at most `max_batch_tokens` padded tokens and
`max_batch_size` rows, run one at a time on a single worker thread (the model is never called concurrently). A pass
that fails fails the requests with rows in it and no others. With batching off each request runs alone. A request
may bring its own back end (ICD evidence: the label attention as well); its rows share passes only with rows of
requests that bring the same one.

`stop()` comes after the server drained its requests (uvicorn answers those in flight before the lifespan ends);
whatever the batcher still holds then, queued or in a pass the drain gave up on, fails with `Stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cmft.backends import Backend, Unit
from cmft.inference import Loaded

log = logging.getLogger("cmft.serve")


class Stopped(RuntimeError):
    """The batcher stopped before computing a request's rows."""


@dataclass
class Job:
    """One request's rows, and where their outputs go."""

    units: list[Unit]
    future: asyncio.Future
    backend: Backend | None = None  # the request's own (ICD evidence), else the batcher's
    outputs: list[Any] = field(default_factory=list)
    failed: BaseException | None = None
    missing: int = 0  # rows not computed yet

    @property
    def tokens(self) -> int:
        return sum(unit.length for unit in self.units)


@dataclass
class Limits:
    """Defaults measured on 2 CPU cores (benchmarks/README.md, Serving): a forward pass costs the same per text from
    1 to 16 rows there, so passes stay small and nothing waits on purpose (requests that queue during a pass form
    the next one). On a GPU raise all three."""

    max_batch_tokens: int = 4096
    max_batch_size: int = 16
    max_wait_ms: float = 0.0
    batching: bool = True


class Batcher:
    """Queue → gathered batch → forward passes on one thread → each request's outputs, in its rows' order."""

    def __init__(self, loaded: Loaded, backend: Backend, limits: Limits,
                 observe: Callable[[str, float], None] | None = None):  # fmt: skip
        self.loaded, self.backend, self.limits = loaded, backend, limits
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmft-model")
        self.observe = observe or (lambda name, value: None)
        self.task: asyncio.Task | None = None
        self.stopped = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """After the server drained its requests: end the loop and fail what it still holds (`Stopped`). A pass
        still running is not waited for; the worker thread ends after it and computes nothing more."""
        self.stopped = True
        if self.task is not None:
            while not self.task.done():  # again should a cancellation be lost (wait_for before Python 3.12)
                self.task.cancel()
                await asyncio.wait([self.task], timeout=0.1)
            if not self.task.cancelled() and self.task.exception() is not None:
                log.error("the batch loop had ended with %s", type(self.task.exception()).__name__)
        while not self.queue.empty():
            _abandon([self.queue.get_nowait()])
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    async def run(self, units: list[Unit], backend: Backend | None = None) -> list[Any]:
        """The outputs of `units` (one request's rows), computed in some batch (by `backend` if given: rows batch
        only with rows of the same back end)."""
        if not units:
            return []
        if self.stopped:
            raise Stopped("the batcher has stopped")
        job = Job(units, asyncio.get_running_loop().create_future(), backend)
        await self.queue.put(job)
        self.observe("queue_depth", self.depth)
        return await job.future

    # the loop ---------------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            jobs = await self._gather()
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self._compute, jobs)
            except asyncio.CancelledError:  # stop(): the pass may still run, nobody waits for it
                _abandon(jobs)
                raise
            except Exception as exc:  # the worker itself failed: answer everyone, keep serving
                for job in jobs:
                    job.failed = job.failed or exc
            for job in jobs:  # those not answered from the worker already
                _answer(job)
            self.observe("queue_depth", self.depth)

    async def _gather(self) -> list[Job]:
        jobs = [await self.queue.get()]
        if not self.limits.batching:
            return jobs
        tokens = jobs[0].tokens
        deadline = time.monotonic() + self.limits.max_wait_ms / 1000
        while tokens < self.limits.max_batch_tokens:
            if self.queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two in 3.10
                    break
                except asyncio.CancelledError:  # stop() while waiting for more
                    _abandon(jobs)
                    raise
            else:
                job = self.queue.get_nowait()
            jobs.append(job)
            tokens += job.tokens
        return jobs

    def _compute(self, jobs: list[Job]) -> None:
        """On the worker thread: every row of `jobs` in length-sorted passes within the limits."""
        rows = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.units))]
        group: dict[int, int] = {}  # rows of one back end together (the batcher's, or a request's own)
        for job in jobs:
            group.setdefault(id(job.backend), len(group))
        rows.sort(key=lambda row: (group[id(jobs[row[0]].backend)], jobs[row[0]].units[row[1]].length))
        loop = jobs[0].future.get_loop()
        for job in jobs:
            job.outputs, job.missing = [None] * len(job.units), len(job.units)
        for batch in self._passes(rows, jobs):
            if self.stopped:  # stop() failed these jobs already
                return
            units = [jobs[j].units[k] for j, k in batch]
            owners = {j for j, _ in batch}
            if all(jobs[j].failed is not None for j in owners):
                continue
            try:
                ids, mask = self.loaded.task.collate(units, self.loaded.pad_id, self.loaded.meta)
                started = time.perf_counter()
                result = (jobs[batch[0][0]].backend or self.backend)(ids, mask)  # an array, or a list of rows
                self.observe("forward_seconds", time.perf_counter() - started)
                self.observe("batch_texts", len(units))
                self.observe("batch_tokens", int(ids.size))
            except Exception as exc:
                log.error("a forward pass of %d rows failed (%s); its %d requests get 500", len(units),
                          type(exc).__name__, len(owners))  # fmt: skip
                for j in owners:
                    jobs[j].failed = exc
                    _post(loop, jobs[j])
                continue
            for row, (j, k) in enumerate(batch):
                jobs[j].outputs[k] = result[row]
                jobs[j].missing -= 1
                if jobs[j].missing == 0:  # answered now, not after the other passes of this batch
                    _post(loop, jobs[j])

    def _passes(self, rows: list[tuple[int, int]], jobs: list[Job]) -> list[list[tuple[int, int]]]:
        """Consecutive length-sorted rows, cut where the padded size would pass the token or row limit."""
        passes: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        for row in rows:
            length = jobs[row[0]].units[row[1]].length
            if current and ((len(current) + 1) * length > self.limits.max_batch_tokens
                            or len(current) >= self.limits.max_batch_size
                            or jobs[row[0]].backend is not jobs[current[0][0]].backend):  # fmt: skip
                passes.append(current)
                current = []
            current.append(row)
        if current:
            passes.append(current)
        return passes


def _answer(job: Job) -> None:
    """On the event loop: the request's outputs, or its pass's failure (once)."""
    if job.future.done():
        return
    if job.failed is not None:
        job.future.set_exception(job.failed)
    elif job.missing == 0:
        job.future.set_result(job.outputs)


def _abandon(jobs: list[Job]) -> None:
    """On the event loop, when the batcher stops: these requests fail (those answered already keep their answer)."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(Stopped("the server stopped before computing this request"))


def _post(loop: asyncio.AbstractEventLoop, job: Job) -> None:
    """From the worker thread: answer `job` on its event loop, unless that loop has closed (nobody waits then)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_answer, job)
