"""Deliver "this frame for user X" to X's connections, wherever they are.

Two implementations of one interface, chosen by configuration, never both (a
frame must not reach a device twice because it went locally *and* via Redis):

- InProcessBroker: no Redis configured; delivery is a function call.
- RedisBroker: per-user channels `<prefix>:user:<id>`. An instance subscribes
  when its first local connection of a user opens and unsubscribes when the
  last one closes, so it receives only what its own users need. One pub/sub
  connection and one reader task per instance. Publishing a message for K
  recipients is one scripted command (one round trip, one reply).

Pub/sub is fire-and-forget: whatever is published while a subscriber is
disconnected is gone. So the reader keeps an outer loop that reconnects with
backoff, re-subscribes, and then asks the hub to bring every local connection
up to date from the database (`on_resync`). A publish that failed is repaired
the same way on every instance, through the `<prefix>:resync` channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .cache import REDIS_FAILURES
from .combine import Combiner

log = logging.getLogger(__name__)

Deliver = Callable[[int, int, str, float], None]  # user id, seq (0: no seq), encoded frame, commit time
Resync = Callable[[], Awaitable[int]]      # returns how many connections were resynchronised
Wants = Callable[[int], bool]              # does this instance have a connection of that user now
SUBSCRIBE_TIMEOUT = 2.0

# One command for a whole outbox batch: as a pipeline of PUBLISHes, redis-py
# parsed every reply under its own timeout, the biggest cost of a fan-out.
_PUBLISH_ALL = """
for i = 1, #KEYS do redis.call('PUBLISH', KEYS[i], ARGV[i]) end
return #KEYS
"""


class InProcessBroker:
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

    async def publish(self, items: Iterable[tuple[int, int, str]], committed_at: float) -> None:
        for user_id, seq, frame in items:
            self.publishes += 1
            self._deliver(user_id, seq, frame, committed_at)


class RedisBroker:
    def __init__(self, url: str, prefix: str, socket_timeout: float, deliver: Deliver, resync: Resync, wants: Wants):
        # A client of its own with no retries: a dropped pub/sub connection must
        # surface here (redis-py would otherwise reconnect it silently and the
        # messages published meanwhile would be lost without a resync).
        self._client = aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                               health_check_interval=30, retry=Retry(NoBackoff(), 0))
        self._prefix = prefix
        self._deliver = deliver
        self._resync = resync
        self._wants = wants
        self._resync_channel = f"{prefix}:resync"
        self._subscribed: set[int] = set()
        self._pubsub: aioredis.client.PubSub | None = None
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._publish_lost = False
        self._closing = False
        self._outbox: asyncio.Queue[list[tuple[int, int, str, float]]] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self._publish_all = self._client.register_script(_PUBLISH_ALL)
        self._aligner: Combiner[int, None] = Combiner(self._align, max_batch=5000)
        self.connected = asyncio.Event()
        self.publishes = self.received = self.reconnects = 0

    def channel(self, user_id: int) -> str:
        return f"{self._prefix}:user:{user_id}"

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="broker-reader")
        self._publisher = asyncio.create_task(self._publish_forever(), name="broker-publisher")

    async def flush(self, timeout: float) -> None:
        """Wait until everything handed to `publish` so far was sent to Redis (or given up
        on: then every instance resyncs once Redis is back), at most `timeout` seconds."""
        if self._publisher is None or self._publisher.done():
            return  # nobody would take them: waiting could only time out
        try:
            await asyncio.wait_for(self._outbox.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("broker: %d frame batch(es) not published after %.1f s at shutdown", self._outbox.qsize(), timeout)

    async def close(self, flush: float = 0.0) -> None:
        """Publish what is in the outbox (up to `flush` seconds), then stop."""
        if flush:
            await self.flush(flush)
        self._closing = True
        await self._aligner.close()
        for task in (self._publisher, self._reader):
            await _stop(task)
        await self._client.aclose()

    async def want(self, user_id: int) -> None:
        """Align the user's subscription with whether we have a connection of theirs *now*
        (so a late unsubscribe cannot undo a newer subscribe). A subscribe returns once
        Redis confirmed it: everything published after that reaches us. Calls made while
        an alignment is in flight share the next one: when thousands of devices
        reconnect at once, that is one SUBSCRIBE for many channels, not a queue of
        round trips behind a lock."""
        await self._aligner.submit(user_id)

    async def _align(self, user_ids: list[int]) -> list[None]:
        done: list[None] = [None] * len(user_ids)
        async with self._lock:
            subscribe: list[str] = []
            unsubscribe: list[str] = []
            for user_id in dict.fromkeys(user_ids):
                wanted = self._wants(user_id)
                if wanted == (user_id in self._subscribed):
                    continue
                (self._subscribed.add if wanted else self._subscribed.discard)(user_id)
                (subscribe if wanted else unsubscribe).append(self.channel(user_id))
            pubsub = self._pubsub
            if pubsub is None or not self.connected.is_set() or not (subscribe or unsubscribe):
                return done  # the reader subscribes to everything wanted when it reconnects
            try:
                if unsubscribe:
                    await pubsub.unsubscribe(*unsubscribe)
                if subscribe:
                    loop = asyncio.get_running_loop()
                    confirmed = [self._confirmations.setdefault(c, loop.create_future()) for c in subscribe]
                    await pubsub.subscribe(*subscribe)
                    await asyncio.wait_for(asyncio.shield(asyncio.gather(*confirmed)), SUBSCRIBE_TIMEOUT)
            except (*REDIS_FAILURES, asyncio.TimeoutError) as exc:
                log.warning("broker: (un)subscribe of %d channel(s) failed: %s; the reader will resubscribe",
                            len(subscribe) + len(unsubscribe), type(exc).__name__)
        return done

    async def publish(self, items: Iterable[tuple[int, int, str]], committed_at: float) -> None:
        """Hand over without waiting on Redis: a slow Redis must not slow the sender.
        One publisher task sends the outbox in order, in pipelined batches."""
        self._outbox.put_nowait([(user_id, seq, frame, committed_at) for user_id, seq, frame in items])

    async def _publish_forever(self) -> None:
        while not self._closing:
            batch = await self._outbox.get()
            taken = 1
            while not self._outbox.empty() and (len(batch) < 1000 or self._publish_lost):  # failing: drain, do not pile up
                batch.extend(self._outbox.get_nowait())
                taken += 1
            channels = [self.channel(user_id) for user_id, _, _, _ in batch]
            payloads = [f"{seq} {committed_at:.6f} {frame}" for _, seq, frame, committed_at in batch]
            if self._publish_lost:
                channels.append(self._resync_channel)
                payloads.append("lost")
            try:
                await self._publish_all(keys=channels, args=payloads)
                self._publish_lost = False
                self.publishes += len(batch)
            except REDIS_FAILURES as exc:
                # The messages are stored; every instance resyncs its devices once Redis is back.
                self._publish_lost = True
                log.warning("broker: publish of %d frame(s) failed (%s); devices will be resynchronised",
                            len(batch), type(exc).__name__)
            finally:
                for _ in range(taken):  # flush() waits on these
                    self._outbox.task_done()

    async def _read_forever(self) -> None:
        backoff = 0.1
        first = True
        while not self._closing:
            pubsub = self._client.pubsub()
            try:
                async with self._lock:
                    await pubsub.subscribe(self._resync_channel, *[self.channel(u) for u in self._subscribed])
                    self._pubsub = pubsub
                self.connected.set()
                if not first:
                    self.reconnects += 1
                    resynced = await self._resync()
                    log.info("broker: reconnected to Redis; %d connection(s) resynchronised", resynced)
                if self._publish_lost:
                    await self._client.publish(self._resync_channel, "lost")
                    self._publish_lost = False
                first, backoff = False, 0.1
                while not self._closing:
                    # Shorter than health_check_interval: a blocking read never health-checks.
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except REDIS_FAILURES as exc:
                if self.connected.is_set():
                    log.warning("broker: disconnected from Redis (%s: %s); reconnecting", type(exc).__name__, exc)
                first = False
            finally:
                self.connected.clear()
                self._pubsub = None
                await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        channel = message["channel"].decode() if isinstance(message["channel"], bytes) else str(message["channel"])
        if kind == "subscribe":
            future = self._confirmations.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "message":
            data = message["data"]
            text = data.decode() if isinstance(data, bytes) else str(data)
            if channel == self._resync_channel:
                resynced = await self._resync()
                log.info("broker: a publish was lost somewhere; %d connection(s) resynchronised", resynced)
                return
            self.received += 1
            seq, committed_at, frame = text.split(" ", 2)
            self._deliver(int(channel.rsplit(":", 1)[1]), int(seq), frame, float(committed_at))


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel until the task is really gone: redis-py can swallow a CancelledError
    that lands inside a command (seen in SUBSCRIBE and pipeline execute)."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
