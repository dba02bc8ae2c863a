"""The group-commit combiner on its own: batching, isolation of failures, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from meeting.combine import Combiner, OutcomeUnknown

from .helpers import until


class Recorder:
    """A batch runner that records its batches and can be held open or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if -1 in items:  # a poisoned item breaks the whole batch, as a database error would
            raise RuntimeError("poison")
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_an_idle_combiner_runs_a_lone_item_at_once() -> None:
    recorder = Recorder()
    combiner = Combiner(recorder.run)
    assert await combiner.submit(2) == 20
    assert recorder.batches == [[2]]


async def _while_held(max_batch: int, first: int, later: list[int]) -> tuple[Recorder, Combiner, list[asyncio.Future]]:
    """Submit `first` and hold its batch open; submit `later` meanwhile (they queue for the
    next batch); then release. Returns the submitters' futures, `first`'s leading."""
    recorder = Recorder()
    recorder.gate.clear()
    combiner: Combiner = Combiner(recorder.run, max_batch=max_batch)
    held = asyncio.ensure_future(combiner.submit(first))
    await asyncio.wait_for(recorder.started.wait(), 5)
    queued = [asyncio.ensure_future(combiner.submit(i)) for i in later]  # queued at the call
    recorder.gate.set()
    return recorder, combiner, [held, *queued]


async def test_items_arriving_during_a_write_share_the_next_one_up_to_max_batch() -> None:
    recorder, combiner, futures = await _while_held(3, 0, [2, 4, 6, 8])
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [0, 20, 40, 60, 80]
    assert recorder.batches == [[0], [2, 4, 6], [8]]
    assert (combiner.batches, combiner.items) == (3, 5)


async def test_per_item_errors_reach_only_their_submitter() -> None:
    _, _, (held, odd, even) = await _while_held(64, 0, [3, 4])
    assert await held == 0 and await even == 40
    with pytest.raises(ValueError, match="odd 3"):
        await odd


async def test_a_failing_batch_is_retried_item_by_item_so_only_the_culprit_fails() -> None:
    recorder, _, futures = await _while_held(64, 0, [2, -1, 4])
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[:2] == [0, 20] and results[3] == 40
    assert isinstance(results[2], RuntimeError)
    assert recorder.batches == [[0], [2, -1, 4], [2], [-1], [4]]


async def test_a_batch_whose_outcome_is_unknown_fails_every_item_and_is_never_retried() -> None:
    runs: list[list[int]] = []
    started, gate = asyncio.Event(), asyncio.Event()

    async def run(items: list[int]) -> list[int | Exception]:
        runs.append(list(items))
        started.set()
        await gate.wait()
        if len(runs) == 2:  # the shared batch: its COMMIT failed and nobody can tell whether it was applied
            raise OutcomeUnknown("commit outcome unknown")
        return [i * 10 for i in items]

    combiner: Combiner = Combiner(run)
    first = asyncio.ensure_future(combiner.submit(1))
    await asyncio.wait_for(started.wait(), 5)
    later = [combiner.submit(i) for i in (2, 3)]  # queued for the next batch while the first is held
    gate.set()
    assert await first == 10
    results = await asyncio.gather(*later, return_exceptions=True)
    assert all(isinstance(r, OutcomeUnknown) for r in results)
    assert runs == [[1], [2, 3]]  # 2 and 3 were not run again, alone or together


async def test_a_cancelled_submitter_still_has_its_item_written_and_close_waits() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    combiner = Combiner(recorder.run)
    task = asyncio.ensure_future(combiner.submit(6))
    await asyncio.wait_for(recorder.started.wait(), 5)
    task.cancel()
    closing = asyncio.ensure_future(combiner.close())
    await asyncio.sleep(0)
    assert not closing.done()  # the write is still held open
    recorder.gate.set()
    await asyncio.wait_for(closing, 5)
    assert recorder.batches == [[6]] and task.cancelled()


class PerBatch:
    """A batch runner whose batches are each held until their own first item is released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: dict[int, asyncio.Event] = {}

    async def run(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.gates.setdefault(items[0], asyncio.Event()).wait()
        return [i * 10 for i in items]

    def release(self, first: int) -> None:
        self.gates.setdefault(first, asyncio.Event()).set()


async def test_a_second_batch_starts_beside_the_first_only_once_a_whole_batch_waits() -> None:
    runner = PerBatch()
    combiner: Combiner = Combiner(runner.run, max_batch=2, max_in_flight=3)
    futures = [asyncio.ensure_future(combiner.submit(0))]
    await until(lambda: runner.batches == [[0]])
    futures.append(asyncio.ensure_future(combiner.submit(2)))
    for _ in range(5):  # a part batch waits behind the one in flight: no statement of its own
        await asyncio.sleep(0)
    assert runner.batches == [[0]]
    futures += [asyncio.ensure_future(combiner.submit(i)) for i in (4, 6)]  # [2, 4] is whole: it starts
    await until(lambda: runner.batches == [[0], [2, 4]])
    futures += [asyncio.ensure_future(combiner.submit(i)) for i in (8, 10)]  # [6, 8] is whole: third in flight
    await until(lambda: runner.batches == [[0], [2, 4], [6, 8]])
    futures += [asyncio.ensure_future(combiner.submit(i)) for i in (12, 14)]
    for _ in range(5):  # three in flight: [10, 12] waits though it is whole
        await asyncio.sleep(0)
    assert runner.batches == [[0], [2, 4], [6, 8]]
    for first in (0, 2, 6, 10, 14):
        runner.release(first)
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [0, 20, 40, 60, 80, 100, 120, 140]
    assert runner.batches[:3] == [[0], [2, 4], [6, 8]] and sorted(sum(runner.batches[3:], [])) == [10, 12, 14]


async def test_a_batch_that_leaves_the_rest_to_another_in_flight_strands_nothing() -> None:
    runner = PerBatch()
    combiner: Combiner = Combiner(runner.run, max_batch=2, max_in_flight=2)
    first = asyncio.ensure_future(combiner.submit(0))
    await until(lambda: runner.batches == [[0]])
    pair = [asyncio.ensure_future(combiner.submit(i)) for i in (2, 4)]
    await until(lambda: runner.batches == [[0], [2, 4]])
    last = asyncio.ensure_future(combiner.submit(6))
    runner.release(0)  # the first finishes, finds less than a batch waiting and another in flight: it leaves
    assert await asyncio.wait_for(first, 5) == 0
    assert not last.done() and runner.batches == [[0], [2, 4]]
    closing = asyncio.ensure_future(combiner.close())
    runner.release(2)  # the second takes what the first left
    runner.release(6)
    assert await asyncio.wait_for(asyncio.gather(*pair, last), 5) == [20, 40, 60]
    await asyncio.wait_for(closing, 5)
    assert runner.batches == [[0], [2, 4], [6]]


async def test_a_batch_task_cancelled_before_its_first_step_neither_blocks_the_combiner_nor_loses_its_batch() -> None:
    runner = PerBatch()
    combiner: Combiner = Combiner(runner.run, max_batch=2, max_in_flight=2)
    lone = asyncio.ensure_future(combiner.submit(8))
    (idle_start,) = combiner._tasks
    idle_start.cancel()  # before it ran a step: its own cleanup never runs
    await until(lambda: not combiner._tasks)
    assert not lone.done()
    first = asyncio.ensure_future(combiner.submit(0))  # the combiner starts again, and 8 goes with it
    await until(lambda: runner.batches == [[8, 0]])
    (running,) = combiner._tasks
    pair = [asyncio.ensure_future(combiner.submit(i)) for i in (2, 4)]  # a whole batch: handed to a second task
    (second,) = combiner._tasks - {running}
    second.cancel()
    await until(lambda: combiner._tasks == {running})
    assert combiner._tasks == {running} and [item for item, _ in combiner._pending] == [2, 4]  # back in the queue
    runner.release(8)
    runner.release(2)
    assert await asyncio.wait_for(asyncio.gather(lone, first, *pair), 5) == [80, 0, 20, 40]
    await asyncio.wait_for(combiner.close(), 5)
    assert runner.batches == [[8, 0], [2, 4]]


async def test_a_batch_that_raises_past_the_retries_answers_its_submitters(caplog: pytest.LogCaptureFixture) -> None:
    async def run(items: list[int]) -> list[int | Exception]:
        return []  # breaks the contract: every item must be answered

    combiner: Combiner = Combiner(run)
    with pytest.raises(AssertionError, match="must answer every item"):
        await asyncio.wait_for(combiner.submit(1), 5)
    await asyncio.wait_for(combiner.close(), 5)
    assert "failed outside its run's answers" in caplog.text
