"""Group commit: requests that arrive while a write is in flight share the next one.

Sending a message costs a handful of statements (lock, update, insert, insert,
commit; on MariaDB sent as two packets, meeting.storage.packets) whatever the
number of messages in the transaction, so under load most of a send's cost is
per transaction, not per message. A Combiner runs one batch at a time: the first
request of an idle combiner starts at once (no timer, no added latency when idle),
and everything submitted while it runs goes into the next batch, up to `max_batch`
items.

One bad item must not fail its neighbours: `run` answers per item (a result or
an exception), and if the whole batch raises, each item is retried alone so
the failure lands only on the item that causes it. That retry is only safe for
a batch that was certainly not applied: a run that cannot tell (its COMMIT failed
ambiguously) answers per item or raises OutcomeUnknown, which is never retried.

A submitted item is written even if its submitter is cancelled meanwhile (a
client that hung up after sending has still sent): the batch task is not the
caller's, and `close` waits for it.

Reads that need no order between batches may allow `max_in_flight` > 1: a second
batch then starts beside the first only once a whole `max_batch` is waiting. A
moderate burst still collects behind the one in flight (each statement has a fixed
cost in the database whatever it carries: many small batches in parallel cost more
than a few full ones), while a flood that outruns one batch at a time gets more.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
RunBatch = Callable[[list[T]], Awaitable[list[R | Exception]]]


class OutcomeUnknown(Exception):
    """Raised by a run whose batch may have been applied: every item gets it, none is retried."""


class Combiner(Generic[T, R]):
    def __init__(self, run: RunBatch[T, R], max_batch: int = 64, name: str = "group-commit", max_in_flight: int = 1):
        self._run = run
        self._name = name  # of its batch tasks
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # each runs batches until it leaves (see _drain)
        self.batches = 0
        self.items = 0

    def submit(self, item: T) -> Awaitable[R]:
        """Queue `item` now, in call order, and return what to await for its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._tasks:  # idle: start now; what is submitted before the task runs joins its batch
            self._start(None)
        elif len(self._tasks) < self._max_in_flight and len(self._pending) >= self._max_batch:
            self._start(self._take())  # this batch is its own from now: the next one counts from zero
        return asyncio.shield(future)

    def _start(self, batch: list[tuple[T, asyncio.Future[R]]] | None) -> None:
        task = asyncio.create_task(self._drain(batch), name=self._name)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, batch))

    def _ended(self, task: asyncio.Task[None], batch: list[tuple[T, asyncio.Future[R]]] | None) -> None:
        """Also for a task cancelled before its first step, whose `_drain` never ran: it must
        not stay counted as in flight (nothing would start again), and the batch it was handed
        goes back to the front of the queue for the next task."""
        self._tasks.discard(task)
        if batch:
            self._pending[:0] = [(item, future) for item, future in batch if not future.done()]

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        return batch

    async def close(self) -> None:
        """Finish what was submitted (shutdown waits for accepted writes)."""
        while self._tasks:  # shielded: a cancelled close must not cancel a batch mid-transaction
            await asyncio.shield(asyncio.gather(*self._tasks, return_exceptions=True))

    async def _drain(self, batch: list[tuple[T, asyncio.Future[R]]] | None) -> None:
        """Run batches while any wait. With others in flight, leave once less than a whole
        batch waits: the others take it. The check and the leaving happen in one step (no
        await between them), so the last task in flight never leaves items behind."""
        me = asyncio.current_task()
        assert me is not None
        try:
            if batch is not None:
                await self._settle(batch)
            await self._batches(me)
        finally:
            self._tasks.discard(me)  # type: ignore[arg-type]

    async def _batches(self, me: asyncio.Task[Any]) -> None:
        while self._pending:
            if len(self._tasks) > 1 and len(self._pending) < self._max_batch:
                self._tasks.discard(me)  # type: ignore[arg-type]
                return
            await self._settle(self._take())

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run one batch and answer each of its submitters."""
        items = [item for item, _ in batch]
        self.batches += 1
        self.items += len(items)
        try:
            outcomes = await self._outcomes(items)
        except asyncio.CancelledError:  # nobody waits forever on a batch that will not finish
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a run that broke its contract: its submitters hear of it
            log.exception("a batch of %d failed outside its run's answers", len(items))
            outcomes = [exc] * len(items)
        for (_, future), outcome in zip(batch, outcomes):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _outcomes(self, items: list[T]) -> list[R | Exception]:
        try:
            outcomes = await self._run(items)
        except OutcomeUnknown as exc:
            log.error("a batch of %d writes may or may not have been applied (%s); not retried", len(items), exc)
            return [exc] * len(items)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            log.warning("a batch of %d writes failed (%s: %s); retrying each alone", len(items), type(exc).__name__, exc)
            outcomes = []
            for item in items:
                outcomes.extend(await self._outcomes([item]))
        assert len(outcomes) == len(items), "run must answer every item"
        return outcomes
