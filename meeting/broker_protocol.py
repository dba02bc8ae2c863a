"""The one interface of the brokers (`Broker`) and the simplest of them, for a single process.

The push hub and the rooms see only `Broker`; which implementation carries the frames is a
matter of configuration (meeting.broker: RedisBroker; meeting.cluster_broker: ClusterBroker).
tests/test_broker_contract.py runs one suite on all three.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable, Protocol, runtime_checkable

Deliver = Callable[[int, int, str, float], None]  # user (room) id, seq (<= 0: follows seq -seq), encoded frame, commit time
Resync = Callable[[list[int] | None], Awaitable[int]]  # those users' (None: all) connections catch up; how many
Wants = Callable[[int], bool]              # does this instance have a connection of that user (room) now


@runtime_checkable
class Broker(Protocol):
    """What the push hub and the rooms rely on, whatever carries the frames."""

    publishes: int

    @property
    def healthy(self) -> bool:
        """No known trouble reaching the other instances (always, in process)."""

    async def start(self) -> None:
        """Begin following the channels of what `wants` says is here."""

    async def want(self, key: int) -> None:
        """Align the subscription to `key` with `wants(key)`; once it returns with `wants` true,
        every frame published after that, from any instance, reaches `deliver` here."""

    async def publish(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        """Deliver (key, seq, frame) here at once (unless `local` is false) and to every other
        instance that wants `key`, in order per key, without waiting on the network."""

    def post(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        """`publish` without an await."""

    async def flush(self, timeout: float) -> None:
        """Return once everything published so far left this instance (or `timeout` passed)."""

    async def close(self, flush: float = 0.0) -> None:
        """Flush for up to `flush` seconds, then stop."""


class InProcessBroker:
    healthy = True  # nothing to lose touch with

    def __init__(self, deliver: Deliver):
        self._deliver = deliver
        self.publishes = 0

    async def start(self) -> None:
        pass

    async def flush(self, timeout: float) -> None:
        pass  # delivery happened in publish()

    async def close(self, flush: float = 0.0) -> None:
        pass

    async def want(self, user_id: int) -> None:
        pass

    async def publish(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        self.post(items, committed_at, local)

    def post(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        """`publish` without an await (safe in a finally block under cancellation).
        `local=False`: the caller delivered to this instance's connections itself."""
        for user_id, seq, frame in items:
            self.publishes += 1
            if local:
                self._deliver(user_id, seq, frame, committed_at)
