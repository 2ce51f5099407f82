"""The dynamic batcher of `cmft serve` driven directly, without a server: a fake backend records every forward pass.

Each row's first token is a marker that the fake backend returns as that row's output, so a request's outputs show
which rows it got back and in which order. Every wait is bounded: a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from cmft.inference import Loaded
from cmft.serving.batcher import Batcher, Job, Limits, Stopped
from cmft.tasks.base import Unit, pad_rows

WAIT = 30.0  # seconds: the bound of every wait below; no test comes near it unless it is broken
REAL_WAIT_FOR = asyncio.wait_for  # kept before any test patches asyncio.wait_for
REAL_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)


class FakeTask:
    name = "fake"

    @staticmethod
    def collate(units: list[Unit], pad_id: int, meta: dict) -> tuple[np.ndarray, np.ndarray]:
        return pad_rows(units, pad_id)


class FakeBackend:
    """(ids, mask) → one output per row: [its marker, its length]. Records each pass's shape; a pass holding a
    poisoned marker fails; with `gate`, a pass waits for it (at most WAIT) after setting `entered`."""

    name = "fake"

    def __init__(self, poison: set[int] = frozenset(), gate: threading.Event | None = None):
        self.shapes: list[tuple[int, int]] = []
        self.poison, self.gate, self.entered = poison, gate, threading.Event()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.shapes.append(ids.shape)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "the test never released the forward pass"
        if self.poison & set(ids[:, 0].tolist()):
            raise RuntimeError("the model failed")
        return np.stack([ids[:, 0], mask.sum(axis=1)], axis=1)


class Watched(Batcher):
    """A Batcher that counts the requests put in its queue (run() reports the depth after each put)."""

    def __init__(self, backend: FakeBackend, limits: Limits):
        self.puts = 0
        super().__init__(loaded(), backend, limits, self.count)

    def count(self, name: str, value: float) -> None:
        if name == "queue_depth" and value > 0:
            self.puts += 1

    async def taken(self, puts: int) -> None:
        """Until `puts` requests were queued and the running loop took them all (it waits for more now)."""
        while self.puts < puts or not self.queue.empty():
            await asyncio.sleep(0)
        assert not self.task.done()


def loaded() -> Loaded:
    return Loaded(task=FakeTask, tokenizer=SimpleNamespace(pad_token_id=0), meta={})


def unit(marker: int, length: int) -> Unit:
    """A row of `length` tokens whose first token is `marker` (markers start at 100, clear of the padding)."""
    return Unit(text=0, input_ids=[marker] + [7] * (length - 1))


def request(*rows: tuple[int, int]) -> list[Unit]:
    return [unit(marker, length) for marker, length in rows]


def answered(outputs: list) -> list[tuple[int, int]]:
    return [(int(output[0]), int(output[1])) for output in outputs]


def run(test) -> None:
    """`test()` in a fresh event loop, bounded."""
    asyncio.run(REAL_WAIT_FOR(test(), 3 * WAIT))


async def queued(b: Batcher, *requests: list[Unit]) -> list[asyncio.Task]:
    """The requests submitted, in order, and all in the queue before the loop starts: the loop gathers them
    together."""
    tasks = [asyncio.ensure_future(b.run(units)) for units in requests]
    while b.depth < len(requests):
        await asyncio.sleep(0)
    return tasks


async def results(tasks: list[asyncio.Task]) -> list:
    return await REAL_WAIT_FOR(asyncio.gather(*tasks, return_exceptions=True), WAIT)


# passes --------------------------------------------------------------------------------------------------------
def test_passes_are_length_sorted_within_the_token_budget_and_each_request_gets_its_own_rows():
    """Rows of lengths 1..5 (15 tokens, one gathered batch) under a 16-token budget: 4 rows × 4 tokens fit,
    a fifth row of 5 would make 5 × 5 = 25 padded tokens, so it runs alone. Outputs come back in each request's
    own row order, not the sorted order."""
    backend = FakeBackend()

    async def test() -> None:
        b = Batcher(loaded(), backend, Limits(max_batch_tokens=16, max_batch_size=16))
        tasks = await queued(b, request((100, 5), (101, 2), (102, 3)), request((103, 4), (104, 1)))
        b.start()
        first, second = await results(tasks)
        await b.stop()
        assert answered(first) == [(100, 5), (101, 2), (102, 3)]
        assert answered(second) == [(103, 4), (104, 1)]

    run(test)
    assert backend.shapes == [(4, 4), (1, 5)]


def test_passes_keep_to_the_row_limit_and_a_row_over_the_budget_runs_alone():
    backend = FakeBackend()

    async def test() -> None:
        b = Batcher(loaded(), backend, Limits(max_batch_tokens=12, max_batch_size=2))
        tasks = await queued(b, request((100, 3), (101, 1)), request((102, 2)), request((103, 20), (104, 4)))
        b.start()
        outputs = await results(tasks)
        await b.stop()
        assert [answered(o) for o in outputs] == [[(100, 3), (101, 1)], [(102, 2)], [(103, 20), (104, 4)]]

    run(test)
    # gathered: 6 tokens, then the third request passes the 12-token budget and closes the batch
    assert backend.shapes == [(2, 2), (2, 4), (1, 20)]
    assert all(rows <= 2 and (rows == 1 or rows * longest <= 12) for rows, longest in backend.shapes)


def test_a_gather_stops_at_the_token_budget():
    async def test() -> None:
        b = Batcher(loaded(), FakeBackend(), Limits(max_batch_tokens=8, max_wait_ms=60_000))
        tasks = await queued(b, request((100, 4)), request((101, 4)), request((102, 4)))
        first = await REAL_WAIT_FOR(b._gather(), WAIT)  # the budget, not the (minute-long) wait, ends it
        assert [job.units[0].input_ids[0] for job in first] == [100, 101]
        assert b.depth == 1
        for task in tasks:
            task.cancel()

    run(test)


def test_without_batching_each_request_runs_alone():
    backend = FakeBackend()

    async def test() -> None:
        b = Batcher(loaded(), backend, Limits(batching=False))
        tasks = await queued(b, request((100, 2)), request((101, 3), (102, 1)))
        b.start()
        outputs = await results(tasks)
        await b.stop()
        assert [answered(o) for o in outputs] == [[(100, 2)], [(101, 3), (102, 1)]]

    run(test)
    assert backend.shapes == [(1, 2), (2, 3)]


# the wait ------------------------------------------------------------------------------------------------------
def test_the_wait_gathers_a_request_arriving_within_it():
    """With a long wait, a request that arrives while the loop waits joins the first one's batch (here the
    token budget, reached by the second request, ends the gather at once)."""
    backend = FakeBackend()

    async def test() -> None:
        b = Watched(backend, Limits(max_batch_tokens=8, max_wait_ms=60_000))
        b.start()
        early = asyncio.ensure_future(b.run(request((100, 4))))
        await b.taken(1)
        late = asyncio.ensure_future(b.run(request((101, 4))))
        outputs = await results([early, late])
        await b.stop()
        assert [answered(o) for o in outputs] == [[(100, 4)], [(101, 4)]]

    run(test)
    assert backend.shapes == [(2, 4)]


class LegacyTimeout(Exception):
    """Stands for Python 3.10's asyncio.TimeoutError, which is not the builtin TimeoutError there."""


@pytest.mark.parametrize("python", ["3.11+", "3.10"])
def test_an_empty_queue_after_the_wait_ends_the_gather(python, monkeypatch):
    """A lone request is answered once the wait is over, and the loop keeps serving; also where asyncio.wait_for
    raises asyncio.TimeoutError, a class of its own (Python 3.10)."""
    if python == "3.10":

        async def wait_for(awaitable, timeout):
            try:
                return await REAL_WAIT_FOR(awaitable, timeout)
            except REAL_TIMEOUTS:
                raise LegacyTimeout from None

        monkeypatch.setattr(asyncio, "TimeoutError", LegacyTimeout)
        monkeypatch.setattr(asyncio, "wait_for", wait_for)
    backend = FakeBackend()

    async def test() -> None:
        b = Batcher(loaded(), backend, Limits(max_batch_tokens=4096, max_wait_ms=20))
        b.start()
        first = await results([asyncio.ensure_future(b.run(request((100, 3))))])
        assert not b.task.done(), b.task.exception()  # the loop survived the timeout
        second = await results([asyncio.ensure_future(b.run(request((101, 2))))])
        await b.stop()
        assert [answered(o) for o in first + second] == [[(100, 3)], [(101, 2)]]

    run(test)
    assert backend.shapes == [(1, 3), (1, 2)]


# failures ------------------------------------------------------------------------------------------------------
def test_a_failing_pass_fails_its_requests_only_and_the_loop_keeps_serving():
    """One row per pass: the poisoned pass fails its request, including that request's other, successful rows;
    the other requests of the batch get their outputs, and later requests are served."""
    backend = FakeBackend(poison={101})

    async def test() -> None:
        b = Batcher(loaded(), backend, Limits(max_batch_size=1))
        tasks = await queued(b, request((100, 2)), request((101, 3), (102, 1)), request((103, 4)))
        b.start()
        fine, poisoned, other = await results(tasks)
        assert answered(fine) == [(100, 2)] and answered(other) == [(103, 4)]
        assert isinstance(poisoned, RuntimeError) and str(poisoned) == "the model failed"
        later = await results([asyncio.ensure_future(b.run(request((104, 2))))])
        assert answered(later[0]) == [(104, 2)]
        await b.stop()

    run(test)
    assert sorted(backend.shapes) == [(1, 1), (1, 2), (1, 2), (1, 3), (1, 4)]


def test_a_failing_worker_fails_the_whole_batch_and_the_loop_keeps_serving(monkeypatch):
    original = Batcher._compute
    calls = []

    def compute(self, jobs: list[Job]) -> None:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise MemoryError("the worker failed")
        original(self, jobs)

    monkeypatch.setattr(Batcher, "_compute", compute)

    async def test() -> None:
        b = Batcher(loaded(), FakeBackend(), Limits())
        tasks = await queued(b, request((100, 2)), request((101, 3)))
        b.start()
        outputs = await results(tasks)
        assert all(isinstance(o, MemoryError) for o in outputs)
        later = await results([asyncio.ensure_future(b.run(request((102, 2))))])
        assert answered(later[0]) == [(102, 2)]
        await b.stop()

    run(test)
    assert calls == [2, 1]


# shutdown ------------------------------------------------------------------------------------------------------
def test_stop_during_a_forward_pass_returns_promptly_and_ends_the_loop_cancelled():
    """The server calls stop() only after draining; should a pass still run then (the drain timed out), stop()
    neither waits for the model nor swallows its own cancellation, and the pass's requests get an error, not a
    hang."""
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    try:

        async def test() -> None:
            b = Batcher(loaded(), backend, Limits())
            b.start()
            held = asyncio.ensure_future(b.run(request((100, 2))))
            assert await asyncio.to_thread(backend.entered.wait, WAIT)
            await REAL_WAIT_FOR(b.stop(), WAIT / 5)
            assert b.task.cancelled()
            (outcome,) = await results([held])
            assert isinstance(outcome, Stopped)
            with pytest.raises(Stopped):
                await REAL_WAIT_FOR(b.run(request((101, 2))), WAIT)

        run(test)
    finally:
        gate.set()  # lets the worker thread end


def test_stop_while_waiting_for_a_batch_fails_the_requests_taken():
    async def test() -> None:
        b = Watched(FakeBackend(), Limits(max_wait_ms=60_000))
        b.start()
        taken = asyncio.ensure_future(b.run(request((100, 2))))
        await b.taken(1)  # and waits up to a minute for more
        await REAL_WAIT_FOR(b.stop(), WAIT)
        assert b.task.cancelled()
        (outcome,) = await results([taken])
        assert isinstance(outcome, Stopped)

    run(test)


def test_a_pass_in_flight_is_answered_when_it_may_finish_before_stop_as_the_drain_does():
    gate = threading.Event()
    backend = FakeBackend(gate=gate)
    try:

        async def test() -> None:
            b = Batcher(loaded(), backend, Limits())
            tasks = await queued(b, request((100, 2), (101, 3)), request((102, 1)))
            b.start()
            assert await asyncio.to_thread(backend.entered.wait, WAIT)
            gate.set()  # the drain: the requests in flight finish, then the server stops the batcher
            outputs = await results(tasks)
            await REAL_WAIT_FOR(b.stop(), WAIT)
            assert b.task.cancelled()
            assert [answered(o) for o in outputs] == [[(100, 2), (101, 3)], [(102, 1)]]

        run(test)
    finally:
        gate.set()
