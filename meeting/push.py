"""Real-time push: the connection map and delivery of stored messages to it.

The map is `app[ws_users]`: user id -> that user's live connections on this
process. The hub is the MessageService's listener: after each commit it
encodes the frame once per message (each recipient's seq spliced in) and hands
it to the broker, which delivers it to the recipients' connections here or on
other instances, with `message.sent` (the sender's view) for the sender's own
devices. Reads become `message.read` for the reader's devices and, coalesced
(meeting.receipts), `message.receipt` for the sender's. It never awaits a
socket, so `POST /messages` returns as soon as the message is stored and
handed over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Coroutine

from aiohttp import web

from . import frames
from .broker import RedisBroker
from .broker_protocol import Broker, InProcessBroker
from .cluster_broker import redis_broker
from .connection import CLOSE_GOING_AWAY
from .presence import Presence
from .receipts import ReceiptCoalescer
from .typedefs import (cache_key, config_key, message_service_key, presence_key, push_hub_key, redis_breaker_key,
                       sessions_key, ws_users)

if TYPE_CHECKING:
    from .ws import UserConnection

log = logging.getLogger(__name__)


class PushHub:
    def __init__(self, users: dict[int, set["UserConnection"]], presence: Presence, max_per_user: int):
        self.users = users
        self.presence = presence
        self.max_per_user = max_per_user
        self.broker: Broker = InProcessBroker(self.deliver_local)
        self.bodies = frames.MessageBodies()
        self.receipts: ReceiptCoalescer | None = None  # set by push_ctx
        self._background: set[asyncio.Task[Any]] = set()
        self.resynced = 0  # connections sent to the database by `resync` (broker trouble), ever

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire-and-forget that survives handler cancellation and is awaited at shutdown."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def register(self, conn: "UserConnection") -> bool:
        """Admit the connection unless its user is at `max_per_user`: counted on this
        instance, then (with Redis) across all instances by presence."""
        live = self.users.get(conn.user_id, set())
        if len([c for c in live if not c.closed]) >= self.max_per_user:
            return False
        if not await self.presence.admit(conn.user_id, conn.id, self.max_per_user):
            return False
        self.users.setdefault(conn.user_id, set()).add(conn)
        return True

    def unregister(self, conn: "UserConnection") -> None:
        """Idempotent and synchronous: safe from a writer task, a finally block, or the sweeper."""
        live = self.users.get(conn.user_id)
        if live is None or conn not in live:
            return
        live.discard(conn)
        if not live:
            del self.users[conn.user_id]
            self.spawn(self.broker.want(conn.user_id))  # re-evaluated under the broker's lock
        self.spawn(self.presence.disconnected(conn.user_id, conn.id))

    def wants(self, user_id: int) -> bool:
        return user_id in self.users

    def may_reach(self, user_id: int) -> bool:
        """Whether a live-only frame for this user (message.sent, message.receipt) could
        reach a device of theirs, so that building it is worth the work. Without Redis
        this process's map knows exactly, at the very moment the frame would be delivered
        (no await in between), so skipping loses nothing. With Redis a device may be on
        any instance, and presence cannot say "none" for sure (a connection admitted
        while Redis was out is counted only from the next heartbeat after it is back) and
        would cost a round trip per send, about what the publish it saves costs (batched
        in the background publisher; Redis drops a PUBLISH nobody subscribed to): so yes."""
        return isinstance(self.broker, RedisBroker) or user_id in self.users

    def sessions_revoked(self, pairs: list[tuple[int, int]]) -> None:
        revoked = {session_id for session_id, _ in pairs}
        for user_id in {user_id for _, user_id in pairs}:
            for conn in list(self.users.get(user_id, ())):
                conn.end_session(revoked)

    def deliver_local(self, user_id: int, seq: int, frame: str, committed_at: float) -> None:
        for conn in list(self.users.get(user_id, ())):
            conn.deliver(seq, frame, committed_at)

    async def resync(self, user_ids: list[int] | None = None) -> int:
        """After broker trouble: every local connection (of `user_ids`) catches up from the database."""
        if user_ids is None:
            conns = [c for conns in list(self.users.values()) for c in list(conns)]
        else:
            conns = [c for user_id in user_ids for c in list(self.users.get(user_id, ()))]
        for conn in conns:
            conn.request_catch_up()
        self.resynced += len(conns)
        return len(conns)

    async def on_stored(self, message: dict[str, Any]) -> None:
        committed_at = time.time()
        frame_for = self.bodies.message_new_for(message)
        items = [(user_id, seq, frame_for(seq)) for user_id, seq in message["seqs"].items()]
        # The sender's devices: seq 0, it is in nobody's inbox of theirs (follows nothing, never replayed).
        if self.may_reach(message["sender_id"]):
            items.append((message["sender_id"], 0, frames.encode("message.sent", message)))
        await self.broker.publish(items, committed_at)

    async def on_read(self, user_id: int, ids: list[int], count: int, upto_seq: int) -> None:
        """Published as seq -upto_seq: the frame follows the message of that seq (meeting.sequencing)."""
        frame = frames.encode("message.read", {"ids": ids, "count": count})
        await self.broker.publish([(user_id, -upto_seq, frame)], time.time())

    def sweep(self) -> int:
        """Drop connections that closed without their handler noticing yet."""
        removed = 0
        for conn in [c for conns in list(self.users.values()) for c in list(conns) if c.closed]:
            self.unregister(conn)
            removed += 1
        return removed

    async def flush(self, timeout: float) -> None:
        """Shutdown: publish everything committed (the broker's outbox), so that devices on
        other instances get it live. Local devices were handed each frame at publish time
        (frames a connection still holds, before message.synced or behind a gap, are not
        flushed: those devices resume with `since`). Read receipts waiting for their window
        go first."""
        if self.receipts is not None:
            await self.receipts.close()
        await self.broker.flush(timeout)

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server going away", drain: float = 0.0) -> None:
        """Close every socket; with `drain`, each first writes what is queued for it (up to
        that many seconds)."""
        conns = [c for conns in list(self.users.values()) for c in list(conns)]
        await asyncio.gather(*(c.flush_and_close(code, reason, drain) for c in conns), return_exceptions=True)

    async def drain_background(self) -> None:
        await asyncio.gather(*list(self._background), return_exceptions=True)


async def _every(interval: float, job: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception:
            log.exception("periodic push job failed")


async def push_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub, its listeners and its periodic jobs; torn down in reverse."""
    cfg = app[config_key].push
    hub = PushHub(app[ws_users], app[presence_key], cfg.max_connections_per_user)
    redis_cfg = app[config_key].redis
    if redis_cfg.url:  # one broker per configuration; RedisBroker delivers here itself and drops its own echoes
        hub.broker = redis_broker(redis_cfg, hub.deliver_local, hub.resync, hub.wants, app[redis_breaker_key])
        hub.broker.on_reconnect.append(app[cache_key].suspect)  # a failover may have lost invalidations
    await hub.broker.start()
    app[push_hub_key] = hub
    service = app[message_service_key]
    hub.receipts = ReceiptCoalescer(cfg.receipt_window, service.read_counts, hub.broker.publish, cfg.receipt_pending_max,
                                    hub.may_reach, cfg.receipt_readers_max)
    service.on_stored.append(hub.on_stored)
    service.on_read.append(hub.on_read)
    service.on_receipts.append(hub.receipts.on_receipts)
    app[sessions_key].on_revoked.append(hub.sessions_revoked)

    async def sweep() -> None:
        removed = hub.sweep()
        if removed:
            log.info("sweeper removed %d closed connection(s); %d user(s) connected", removed, len(hub.users))

    async def refresh_presence() -> None:
        await app[presence_key].heartbeat([(c.user_id, c.id) for conns in list(hub.users.values()) for c in conns])

    tasks = [asyncio.create_task(_every(cfg.cleanup_interval, sweep), name="push-sweeper"),
             asyncio.create_task(_every(cfg.heartbeat, refresh_presence), name="presence-refresh")]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # on_shutdown already delivered and closed (see web.drain_then_close); a write that
    # committed since then is still published before the broker goes.
    await service.close()
    service.on_receipts.remove(hub.receipts.on_receipts)
    await hub.receipts.close()
    await hub.close_all()
    await hub.drain_background()
    await hub.broker.close(flush=app[config_key].server.shutdown_timeout)
    app[sessions_key].on_revoked.remove(hub.sessions_revoked)
    service.on_stored.remove(hub.on_stored)
    service.on_read.remove(hub.on_read)
