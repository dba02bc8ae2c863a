"""meeting.deadlines: the one timer behind every socket's token expiry (the sockets' own
behaviour, notice then 4001, is in test_ws.py and test_meetings.py)."""

from __future__ import annotations

import asyncio

from meeting.deadlines import COMPACT_MIN, Deadlines


class Recorder:
    """A target that notes the order deadlines fire in, and can re-arm itself once."""

    def __init__(self, name: str, log: list[str], done: asyncio.Event | None = None, again: float | None = None):
        self.name, self.log, self.done, self.again = name, log, done, again

    def on_deadline(self, deadlines: Deadlines) -> None:
        self.log.append(self.name)
        if self.again is not None:
            self.again, again = None, self.again
            self.name += "-again"
            deadlines.add(again, self)
        elif self.done is not None:
            self.done.set()


async def test_deadlines_fire_in_order_once_and_cancelled_ones_never() -> None:
    deadlines, log, done = Deadlines(), [], asyncio.Event()
    deadlines.add(0.06, Recorder("last", log, done))
    deadlines.add(0.02, Recorder("second", log))
    cancelled = deadlines.add(0.03, Recorder("cancelled", log))
    deadlines.add(0.0, Recorder("first", log))
    cancelled.cancel()
    cancelled.cancel()  # idempotent
    assert len(deadlines) == 3
    await asyncio.wait_for(done.wait(), 5)
    assert log == ["first", "second", "last"]
    assert len(deadlines) == 0
    deadlines.close()


async def test_a_target_may_set_its_next_deadline_while_deadlines_fire() -> None:
    """The socket's notice sets its close from inside the firing loop. The order depends on
    due times only (the re-armed one is due after "other" however late the first fired)."""
    deadlines, log, done = Deadlines(), [], asyncio.Event()
    deadlines.add(0.0, Recorder("notice", log, done, again=0.02))
    deadlines.add(0.01, Recorder("other", log))
    await asyncio.wait_for(done.wait(), 5)
    assert log == ["notice", "other", "notice-again"]
    assert len(deadlines) == 0
    deadlines.close()


async def test_a_failing_target_does_not_stop_the_others(caplog) -> None:  # type: ignore[no-untyped-def]
    class Broken:
        def on_deadline(self, deadlines: Deadlines) -> None:
            raise RuntimeError("boom")

    deadlines, log, done = Deadlines(), [], asyncio.Event()
    deadlines.add(0.0, Broken())
    deadlines.add(0.0, Recorder("after", log, done))
    await asyncio.wait_for(done.wait(), 5)
    assert log == ["after"] and "boom" in caplog.text
    deadlines.close()


async def test_cancelled_deadlines_do_not_pile_up_until_they_come_due() -> None:
    """A reconnect storm cancels thousands of deadlines hours ahead: once cancelled ones are
    more than half the heap, it is rebuilt without them; the live ones still fire."""
    deadlines, log, done = Deadlines(), [], asyncio.Event()
    far = [deadlines.add(3600.0, Recorder(f"far{i}", log)) for i in range(4 * COMPACT_MIN)]
    deadlines.add(0.01, Recorder("soon", log, done))
    for deadline in far[: 3 * COMPACT_MIN]:
        deadline.cancel()
    assert len(deadlines) == COMPACT_MIN + 1
    assert len(deadlines._heap) <= 2 * (COMPACT_MIN + 1)  # rebuilt, not 4 * COMPACT_MIN + 1
    await asyncio.wait_for(done.wait(), 5)
    assert log == ["soon"] and len(deadlines) == COMPACT_MIN
    deadlines.close()
