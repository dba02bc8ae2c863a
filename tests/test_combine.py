"""The group-commit combiner on its own: batching, isolation of failures, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from meeting.combine import Combiner, OutcomeUnknown


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
