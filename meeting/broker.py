"""Deliver "this frame for user X" (or "for meeting room M") to X's connections, wherever they are.

Three implementations of one interface (`Broker`, meeting.broker_protocol), chosen by
configuration, one at a time; tests/test_broker_contract.py runs the same tests on each:

- InProcessBroker (meeting.broker_protocol): no Redis configured; delivery is a function call.
- ClusterBroker (meeting.cluster_broker): `redis.cluster`; RedisBroker on sharded channels.
- RedisBroker: per-key channels `<prefix>:<kind>:<id>` (kind `user` for the
  push hub, `room` for meeting rooms; one broker, one pub/sub connection and
  one reader task per kind and instance). An instance subscribes when its
  first local connection of a user (a member of a room) opens and unsubscribes
  when the last one closes, so it receives only what its own connections need.
  Publishing a batch of frames is one scripted command (one round trip).

Local delivery never waits for Redis: `publish` hands each frame to this
instance's own connections at once and queues it for the other instances.
Every payload carries the publishing instance's id, and the reader drops the
frames that come back to their origin, so a frame reaches a local device once
(message frames are also deduplicated by seq; `message.read` and room frames
have no seq and rely on this alone).

Redis is an accelerator, not a dependency. The publisher is a task of its own,
so a hung Redis delays no sender. When a publish fails (reported to the
process's circuit breaker, meeting.breaker, shared with the cache and
presence) the messages are stored all the same, and as soon as Redis answers
again the publisher says so on `<prefix>:resync`, so every instance brings its
devices up to date from the database.

Pub/sub is fire-and-forget: whatever is published while a subscriber is
disconnected is gone. So the reader keeps an outer loop that reconnects with
backoff, re-subscribes, and then asks the hub to bring every local connection
up to date from the database (`on_resync`). A hung Redis (frozen, or a network
path that drops packets without a reset) never closes the socket, so the
reader pings when the channel was idle and treats a missing answer as a
disconnection. A publish that failed is repaired the same way on every
instance, through the `<prefix>:resync` channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Awaitable, Callable, Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .breaker import REDIS_FAILURES, RedisBreaker
from .broker_protocol import Deliver, Resync, Wants
from .combine import Combiner
from .pubsub import Reply, Subscriber

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 2.0
IDLE_PING = 1.0                            # seconds of silence on the pub/sub connection before a PING

# One command for a whole outbox batch: as a pipeline of PUBLISHes, redis-py
# parsed every reply under its own timeout, the biggest cost of a fan-out.
_PUBLISH_ALL = """
for i = 1, #KEYS do redis.call('PUBLISH', KEYS[i], ARGV[i]) end
return #KEYS
"""


class RedisBroker:
    def __init__(self, url: str, prefix: str, socket_timeout: float, deliver: Deliver, resync: Resync | None, wants: Wants,
                 breaker: RedisBreaker | None = None, kind: str = "user"):
        self._client = self._connect(url, socket_timeout)
        self._prefix = prefix
        self._kind = kind
        self._timeout = socket_timeout
        self._deliver = deliver
        self._resync = resync  # None: nothing to repair (room frames are live only)
        self._wants = wants
        self._breaker = breaker or RedisBreaker(self._client, log_interval=30.0, probe_timeout=socket_timeout)
        self.origin = uuid.uuid4().hex[:12]  # this instance, in every payload it publishes
        self._resync_channel = f"{prefix}:resync"
        self._resync_channel_bytes = self._resync_channel.encode()
        self._echo = f"{self.origin} ".encode()  # how every payload of ours starts
        self._late: set[str] = set()
        self._reader_down = False  # subscriptions sent but not confirmed in time
        self._subscribed: set[int] = set()
        self._pubsub: Subscriber | None = None
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
        # Run after a reconnect, before the resync: Redis may have failed over or restarted and
        # lost acknowledged writes (the message cache orphans its entries, meeting.cache).
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self.publishes = self.received = self.reconnects = self.echoes = 0
        if resync is not None:
            self._breaker.on_recovered.append(self._wake_publisher)

    def _connect(self, url: str, socket_timeout: float) -> aioredis.Redis:
        # A client of its own with no retries, for the publisher: a failed publish must
        # surface (and be repaired by a resync), not be retried behind the breaker's back.
        # The pub/sub connection (meeting.pubsub) is made from its settings and never
        # reconnects by itself: a drop reaches the reader, which resubscribes and resyncs.
        return aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                       health_check_interval=30, retry=Retry(NoBackoff(), 0))

    def channel(self, user_id: int) -> str:
        return f"{self._prefix}:{self._kind}:{user_id}"

    @property
    def healthy(self) -> bool:
        """No known trouble: the reader has not lost its connection (or has it back) and the
        breaker is closed. (Not "connected": a reader still starting up is not trouble.)"""
        return not self._reader_down and self._breaker.available

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
                # A subscription confirmed later may have missed what was published meanwhile:
                # its confirmation triggers a resync (`_control`). If the connection dies
                # instead, the reader resubscribes everything and resyncs.
                self._late.update(subscribe)
                log.warning("broker: (un)subscribe of %d channel(s) not confirmed: %s; resync when it is",
                            len(subscribe) + len(unsubscribe), type(exc).__name__)
        return done

    async def publish(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        self.post(items, committed_at, local)

    def post(self, items: Iterable[tuple[int, int, str]], committed_at: float, local: bool = True) -> None:
        """Deliver to this instance's connections now and hand over to the other
        instances without waiting on Redis: a slow or absent Redis must neither slow
        the sender nor delay a local device. One publisher task sends the outbox in
        order, in batches. `local=False`: the caller delivered locally itself."""
        batch = [(user_id, seq, frame, committed_at) for user_id, seq, frame in items]
        self._outbox.put_nowait(batch)  # first: a local delivery that raised must not cost the other instances
        if local:
            for user_id, seq, frame, _ in batch:
                self._deliver(user_id, seq, frame, committed_at)

    async def _wake_publisher(self) -> None:
        """Breaker closed again: the resync notice must not wait for the next send."""
        if self._publish_lost:
            self._outbox.put_nowait([])

    async def _publish_forever(self) -> None:
        while not self._closing:
            batch = await self._outbox.get()
            taken = 1
            while not self._outbox.empty() and (len(batch) < 1000 or self._publish_lost):  # failing: drain, do not pile up
                batch.extend(self._outbox.get_nowait())
                taken += 1
            try:
                await self._send(batch)
            finally:
                for _ in range(taken):  # flush() waits on these
                    self._outbox.task_done()

    async def _send(self, batch: list[tuple[int, int, str, float]]) -> None:
        # Tried even while the breaker is open: this task is no request's, and the breaker
        # may have opened on a hiccup elsewhere (a cache timeout), while a frame given up
        # here is repaired for messages (resync) but not for `message.read` or room frames.
        channels = [self.channel(user_id) for user_id, _, _, _ in batch]
        payloads = [f"{self.origin} {seq} {committed_at:.6f} {frame}" for _, seq, frame, committed_at in batch]
        if self._publish_lost:
            channels.append(self._resync_channel)
            payloads.append("lost")
        if not channels:
            return
        try:
            await self._transmit(channels, payloads)
            self._publish_lost = False
            self.publishes += len(batch)
        except REDIS_FAILURES as exc:
            # The messages are stored; every instance resyncs its devices once Redis is back.
            self._publish_lost = self._resync is not None
            self._breaker.failed(exc, f"the {self._kind} broker's publisher")
            log.warning("broker: publish of %d frame(s) failed (%s); devices will be resynchronised",
                        len(batch), type(exc).__name__)

    async def _transmit(self, channels: list[str], payloads: list[str]) -> None:
        await self._publish_all(keys=channels, args=payloads)

    async def _read_forever(self) -> None:
        backoff = 0.1
        first = True
        while not self._closing:
            pubsub = self._new_pubsub()
            reading: asyncio.Task[None] | None = None
            try:
                async with self._lock:
                    # The resync channel also keeps a broker with nothing else to follow connected.
                    channels = [self._resync_channel, *[self.channel(u) for u in self._subscribed]]
                    loop = asyncio.get_running_loop()
                    confirmed = [self._confirmations.setdefault(c, loop.create_future()) for c in channels]
                    await self._open(pubsub, channels)
                    self._late.clear()  # everything is subscribed afresh; the resync below covers the gap
                    self._pubsub = pubsub
                self.connected.set()
                reading = asyncio.create_task(self._read(pubsub), name="broker-read")
                # Resync only once Redis confirmed the subscriptions: a message committed after the
                # resync read the database but published before a subscription took effect would
                # reach neither way.
                await self._confirmed(confirmed, reading)
                self._reader_down = False
                if not first:
                    self.reconnects += 1
                    for hook in self.on_reconnect:
                        await hook()
                    if self._resync is not None:
                        resynced = await self._resync(None)
                        log.info("broker: reconnected to Redis; %d connection(s) resynchronised", resynced)
                if self._publish_lost and self._breaker.available:
                    await self._transmit([self._resync_channel], ["lost"])
                    self._publish_lost = False
                first, backoff = False, 0.1
                await reading
            except asyncio.CancelledError:
                raise
            except REDIS_FAILURES as exc:
                self._reader_down = True
                if self.connected.is_set():
                    log.warning("broker: disconnected from Redis (%s: %s); reconnecting", type(exc).__name__, exc)
                else:  # could not even (re)connect: Redis is out for everyone here, not just this socket
                    self._breaker.failed(exc, f"the {self._kind} broker's reader")
                first = False
            finally:
                self.connected.clear()
                self._pubsub = None
                await _stop(reading)
                await asyncio.shield(pubsub.aclose())
            delay = backoff * (1 + random.random())
            if self._breaker.open:  # reconnect as soon as the probe sees Redis answer again
                await self._breaker.wait_closed(delay)
            else:
                await asyncio.sleep(delay)
            backoff = min(backoff * 2, 5.0)

    async def _confirmed(self, confirmed: list[asyncio.Future[None]], reading: asyncio.Task[None]) -> None:
        """Wait for these subscriptions' confirmations (read by `reading`); raise what ended
        `reading` first, or TimeoutError when they take longer than SUBSCRIBE_TIMEOUT plus a
        second per 5,000 channels (tens of thousands after a reconnect: the reader reconnects)."""
        timeout = SUBSCRIBE_TIMEOUT + len(confirmed) / 5000
        every = asyncio.ensure_future(asyncio.shield(asyncio.gather(*confirmed)))
        try:
            done, _ = await asyncio.wait([every, reading], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            every.cancel()
        if reading in done:
            reading.result()
            raise TimeoutError("the pub/sub reader stopped before its subscriptions were confirmed")
        if every not in done:
            raise TimeoutError(f"{len(confirmed)} subscription(s) not confirmed in {timeout:.1f} s")

    def _new_pubsub(self) -> Subscriber:
        return Subscriber(self._client)

    async def _open(self, pubsub: Subscriber, channels: list[str]) -> None:
        """Connect and subscribe to `channels` (confirmations arrive through `_read`)."""
        await pubsub.open()
        await pubsub.subscribe(*channels)

    async def _read(self, pubsub: Subscriber) -> None:
        """Dispatch until the connection fails. A frozen Redis leaves the socket open and
        silent: after IDLE_PING seconds without a byte, PING; no answer (a pong or
        anything else) within the socket timeout is a disconnection. Each read takes
        every reply one socket read brought (meeting.pubsub), so a burst of thousands of
        messages costs a few reads, not a timeout and a wake-up each."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged: float | None = None
        wait = min(1.0, IDLE_PING)
        while not self._closing:
            before = loop.time()
            replies = await pubsub.read(wait)
            now = loop.time()
            if replies is not None:
                heard, pinged = now, None
                if replies:
                    await self._dispatch(replies)
            elif pinged is not None and now - pinged > self._timeout and now - before < wait + 0.5:
                # (Only after a read that came back on time: when this loop itself was stalled,
                # the answer may be sitting unread in the socket.)
                raise TimeoutError(f"no answer to PING on the pub/sub connection in {self._timeout:.1f} s")
            elif pinged is None and now - heard >= IDLE_PING:
                await pubsub.ping()
                pinged = now

    async def _dispatch(self, replies: list[Reply]) -> None:
        """The hot loop of a fan-out: most replies are messages, and on a busy instance most
        of those are its own echoes (it follows its users' channels, and delivered to its
        own devices at publish time), recognised by their first bytes and dropped before
        anything is decoded."""
        echo = self._echo
        resync_channel = self._resync_channel_bytes
        deliver = self._deliver
        echoes = received = 0
        try:
            for reply in replies:
                if isinstance(reply, list) and len(reply) == 3 and (reply[0] == b"message" or reply[0] == b"smessage"):
                    data = reply[2]
                    if data.startswith(echo):
                        echoes += 1  # delivered locally when it was published
                        continue
                    channel = reply[1]
                    if channel == resync_channel:
                        if self._resync is not None:
                            resynced = await self._resync(None)
                            log.info("broker: a publish was lost somewhere; %d connection(s) resynchronised", resynced)
                        continue
                    _, seq, committed_at, frame = data.decode().split(" ", 3)
                    received += 1
                    deliver(int(channel[channel.rindex(b":") + 1:]), int(seq), frame, float(committed_at))
                else:
                    await self._control(reply)
        finally:
            self.echoes += echoes
            self.received += received

    async def _control(self, reply: Reply) -> None:
        """Anything but a message: a (un)subscription's confirmation, a pong, an error."""
        if isinstance(reply, Exception):
            raise reply  # an error reply: the reader reconnects and resyncs
        if not isinstance(reply, list) or not reply:
            return  # +PONG, before any subscription
        kind = reply[0]
        if kind == b"subscribe" or kind == b"ssubscribe":
            channel = reply[1].decode()
            future = self._confirmations.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            if channel in self._late:
                self._late.discard(channel)
                if self._resync is not None:
                    resynced = await self._resync([int(channel.rsplit(":", 1)[1])])
                    log.info("broker: late subscription to %s confirmed; %d connection(s) resynchronised", channel, resynced)


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel until the task is really gone: redis-py can swallow a CancelledError
    that lands inside a command (seen in SUBSCRIBE and pipeline execute)."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
