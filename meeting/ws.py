"""GET /ws/messages: every online device of a user gets each of its messages at once.

Connect sequence, gap-free and duplicate-free:
1. authenticate (HTTP 401 before any upgrade), upgrade, register in the map and
   subscribe on the broker (confirmed): from here every new message reaches us,
   and is held back until step 3; then `connected`;
2. read from the database *after* step 1, either the unread backlog up to the
   user's last seq (`message.unread`), or with `?since=` every message after it
   (`message.new`), a page at a time as the socket drains (`Connection.room`);
3. `message.synced`, and live frames through the connection's SeqGate, which
   drops what was already sent and fills any gap from the database.
So a device sees every message exactly once, in seq order, whatever the broker did.

Read-sync frames (`message.read`) take the same road: held until `message.synced`,
then through the gate as followers of the highest seq they name, so a read never
reaches a device before the message it marks (see meeting.sequencing).

Steps 2-3 run in a task beside the read loop: a device that goes away in the
middle of a long replay stops it at its next page.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, Awaitable, Callable, Coroutine

from aiohttp import WSMsgType, web
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from . import frames
from .connection import (
    CLOSE_SERVER_ERROR, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG, CLOSE_TOO_MANY_CONNECTIONS, CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNSUPPORTED, Connection, accept,
)
from .errors import DomainError, Unauthorized
from .handlers.common import admit_websocket, authenticate, decode_json, doc, parse_query, public, websocket_token
from .schemas import Id, QueryInt
from .sequencing import SeqGate
from .typedefs import config_key, deadlines_key, message_service_key, push_hub_key, sessions_key, stats_key

log = logging.getLogger(__name__)
PAGE = 200
Fetch = Callable[[int, int, int], Awaitable[list[dict[str, Any]]]]  # user id, after seq, limit
Item = tuple[str, "float | None", bool]  # an encoded frame, its message's commit time, live only (droppable)


class UserConnection(Connection):
    """A user's push socket: seq ordering, catch-up and token timers on top of the queue.

    `deliver` takes what the broker brings: seq > 0 is the `message.new` of that seq,
    seq < 0 a frame that must follow seq -seq (a `message.read`), seq 0 a live-only
    frame that follows nothing (`message.sent`, `message.receipt`). Live-only frames
    give way when frames are held: before `message.synced` at most half the queue of
    them waits (the rest are dropped, as they are when the gate's followers are full),
    since the device re-reads the sent box and receipts anyway and a socket closed for
    them would cost a whole resync; after it, one that does not fit the queue is dropped
    too (`Connection.push(droppable=True)`). Every drop counts in
    `meeting_live_frames_dropped`.
    """

    __slots__ = ("gate", "page", "_live", "_early", "_early_live", "_early_known", "_fetch", "_encode", "_catching_up",
                 "_again", "_syncing")

    def __init__(self, ws: web.WebSocketResponse, user_id: int, queue_limit: int,
                 on_dead: Callable[[Connection], None] | None = None, fetch: Fetch | None = None,
                 stats: Any = None, encode: Callable[[dict[str, Any]], str] | None = None, queue_bytes: int = 1 << 20):
        super().__init__(ws, user_id, queue_limit, on_dead, stats, queue_bytes)
        self.gate: SeqGate[Item] | None = None  # set when the initial sync starts
        # Rows fetched per page: half the queue, so a page pushed at low water leaves room
        # for live frames, pongs and read syncs before the limit.
        self.page = max(1, min(PAGE, queue_limit // 2))
        self._live = False                      # until message.synced went out, broker frames wait
        self._early: list[tuple[int, Item]] = []
        self._early_live = 0                    # live-only frames (seq 0) among them
        self._early_known = 0                   # highest seq dropped from _early over the limit
        self._fetch = fetch
        self._encode = encode or (lambda row: frames.encode("message.new", row))  # a stored row as message.new
        self._catching_up: asyncio.Task[None] | None = None
        self._again = False                     # a catch-up was asked for since the last fetch began
        self._syncing: asyncio.Task[None] | None = None  # steps 2-3 (see run_sync), only while they run

    def deliver(self, seq: int, frame: str, committed_at: float | None = None) -> None:
        """A frame from the broker: held until message.synced, then through the gate."""
        if not self._live or self.gate is None:
            if seq == 0:  # live only: dropped rather than let it crowd the queue at go_live
                if len(self._early) < self._queue_limit and self._early_live < self._queue_limit // 2:
                    self._early.append((seq, (frame, committed_at, True)))
                    self._early_live += 1
                else:
                    self._dropped()
            elif len(self._early) < self._queue_limit:
                self._early.append((seq, (frame, committed_at, False)))
            elif seq > 0:  # stored: the catch-up after message.synced fetches it
                self._early_known = max(self._early_known, seq)
            else:
                self._too_slow()
            return
        self._offer(seq, (frame, committed_at, seq == 0))
        if self.gate.waiting:
            self.request_catch_up()

    def _offer(self, seq: int, item: Item) -> None:
        gate = self.gate
        assert gate is not None
        if seq > 0:
            ready = gate.offer(seq, item)
        elif gate.followers >= self._queue_limit:
            if seq < 0:  # a read sync must not be lost; a live-only frame may be
                self._too_slow()
            else:
                self._dropped()
            return
        else:
            ready = gate.follow(-seq, item)
        for frame in ready:
            self.push(*frame)

    def _dropped(self) -> None:
        if self.stats is not None:
            self.stats.live_frames_dropped += 1

    def _too_slow(self) -> None:
        log.info("closing connection %s of user %s: too many frames held", self.id, self.user_id)
        if self.stats is not None:
            self.stats.slow_consumer_closes += 1
        self.close_soon(CLOSE_TRY_AGAIN_LATER, "too slow: reconnect and resync")

    def start(self, last_seq: int) -> None:
        """The device has (or is being sent) everything up to `last_seq`."""
        self.gate = SeqGate(last_seq, cap=self._queue_limit)

    def go_live(self) -> None:
        """After message.synced: release what the broker brought meanwhile, in order."""
        assert self.gate is not None
        self._live = True
        early, self._early, self._early_live = self._early, [], 0
        for seq, item in early:
            self._offer(seq, item)
        self.gate.heard(self._early_known)
        if self.gate.waiting or self._again:
            self.request_catch_up()

    def request_catch_up(self) -> None:
        """Fetch what the gate misses. Never lost: a request during a catch-up makes it
        fetch once more; one before message.synced runs at go_live."""
        if self.ended:
            return
        self._again = True
        if self._live and (self._catching_up is None or self._catching_up.done()):
            self._catching_up = asyncio.create_task(self._catch_up_or_close(), name=f"ws-catchup-{self.id}")

    async def catch_up(self) -> None:
        """Send, in seq order, everything stored after what this device has, a page at a
        time as the socket drains; until nothing waits in the gate and nobody asked again.
        Returns as soon as the connection closes."""
        assert self.gate is not None and self._fetch is not None
        gate = self.gate
        while True:
            self._again = False
            if not await self.room():
                return
            rows = await self._fetch(self.user_id, gate.last, self.page)
            if self.ended:
                return
            for row in rows:
                frame = self._encode(row)
                if not self.fits(frame) and not await self.room(frame):  # bytes, not only frames, bound a page
                    return
                self._offer(row["seq"], (frame, None, False))
            if len(rows) == self.page or self._again:
                continue
            if not gate.waiting:
                return
            if not rows:  # held frames whose rows are not stored: cannot happen (published after commit)
                log.warning("connection %s: seqs %d..%d announced but not stored", self.id, gate.last + 1, gate.known)
                return

    async def _catch_up_or_close(self) -> None:
        try:
            await self.catch_up()
        except Exception:
            log.exception("catch-up of connection %s failed", self.id)
            self.close_soon(CLOSE_SERVER_ERROR, "server error: reconnect with backoff")

    def run_sync(self, sync: Coroutine[Any, Any, None]) -> None:
        """Run steps 2-3 in a task beside the read loop. The task is forgotten once done: a
        finished Task with its coroutine is about 600 bytes, which every idle socket would
        otherwise keep for its whole life."""
        self._syncing = asyncio.create_task(sync, name=f"ws-sync-{self.id}")
        self._syncing.add_done_callback(self._synced)

    def _synced(self, task: asyncio.Task[None]) -> None:
        if self._syncing is task:
            self._syncing = None

    async def stop(self) -> None:
        """Neither the catch-up nor the initial sync is cancelled; each ends by itself after
        the query it is in: a query cancelled midway makes SQLAlchemy terminate its
        connection, which can hang while the engine is being disposed at shutdown."""
        await super().stop()
        for task in (self._catching_up, self._syncing):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)


class ConnectQuery(Schema):
    class Meta:
        unknown = EXCLUDE  # a client's own parameters (cache busters...) are none of our business

    since = QueryInt(load_default=None, validate=validate.Range(0, 2**63 - 1))


class ClientFrame(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["ping", "read", "refresh"]))
    payload = fields.Dict(load_default=dict)


class ReadIn(Schema):
    ids = fields.List(Id(), required=True, validate=validate.Length(1, 1000))


class RefreshIn(Schema):
    token = fields.String(required=True)


CONNECT_QUERY, CLIENT_FRAME, READ_IN, REFRESH_IN = ConnectQuery(), ClientFrame(), ReadIn(), RefreshIn()


@doc("Real-time push WebSocket (upgrade); see docs/websocket.md", query=ConnectQuery, response=(101, None),
     errors=(400, 401, 403, 429), tag="push")  # 400: not an upgrade request
@public  # authenticates itself: browsers cannot set headers on a WebSocket
async def messages_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    token = websocket_token(request)
    if token is None:
        raise Unauthorized("A token is required (`bearer` subprotocol, Authorization header or `token` query).", code="missing_token")
    claims = await authenticate(app, token)
    del token  # this socket's own copy of the JWT (~250 bytes); the frame lives as long as the socket
    await admit_websocket(request, claims.user_id)
    since = parse_query(request, CONNECT_QUERY)["since"]
    cfg = app[config_key].push
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat, max_msg_size=cfg.max_frame_size, protocols=("bearer",),
                               compress=cfg.compress)
    await accept(ws, request)
    hub = app[push_hub_key]
    service = app[message_service_key]
    stats = app[stats_key]
    conn = UserConnection(ws, claims.user_id, cfg.queue_limit, on_dead=hub.unregister, fetch=service.received_after_seq,
                          stats=stats, encode=hub.bodies.message_new, queue_bytes=cfg.queue_bytes)
    conn.session_id = claims.session_id
    try:
        admitted = await hub.register(conn)
    except Exception:  # e.g. the shared admission failed: this socket ends cleanly, nothing registered
        log.exception("admitting push connection %s failed", conn.id)
        await conn.close(CLOSE_SERVER_ERROR, "server error: reconnect with backoff")
        await conn.stop()
        return ws
    if not admitted:
        await conn.close(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
        await conn.stop()
        return ws
    if app[sessions_key].is_revoked(conn.session_id):  # logged out while we were connecting: the
        conn.close_soon(CLOSE_TOKEN_EXPIRED, "logged out")  # revocation's listeners did not see us yet
    try:
        await hub.broker.want(conn.user_id)
        conn.push(frames.encode("connected", {"user_id": conn.user_id, "connection_id": conn.id, "heartbeat": cfg.heartbeat}))
        conn.run_sync(_sync(app, conn, since, claims.expires_at))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await _on_text(app, conn, msg.data)
            elif msg.type == WSMsgType.BINARY:
                await conn.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            elif msg.type == WSMsgType.ERROR and ws.close_code != CLOSE_TOO_BIG:
                log.debug("push socket error: %s", ws.exception())
    except Exception:
        log.exception("push connection %s failed", conn.id)
        await conn.close(CLOSE_SERVER_ERROR, "server error: reconnect with backoff")
    finally:
        hub.unregister(conn)  # synchronous first: under cancellation the next await may not return
        if isinstance(ws.exception(), asyncio.TimeoutError):
            stats.heartbeat_timeouts += 1
        conn.cancel_timers()
        await conn.stop()  # a replay, backlog or sync stops at its next page (see UserConnection.stop: not cancelled)
    return ws


async def _sync(app: web.Application, conn: UserConnection, since: int | None, expires_at: dt.datetime) -> None:
    """Steps 2 and 3: the backlog or the replay, `message.synced`, then live. Runs beside
    the read loop, which answers pings and takes reads meanwhile (their `message.read`
    waits for `message.synced` like every broker frame)."""
    service = app[message_service_key]
    cfg = app[config_key].push
    try:
        if conn.ended:  # closed while connecting (a logout): no reads left half done
            return
        if since is None:
            limit = cfg.backlog_limit
            last, count, first_page = await service.sync_point(conn.user_id, min(PAGE, limit))
            await _send_backlog(app, conn, last, count, first_page, limit, app[push_hub_key].bodies)
            conn.start(last)
        else:  # a resume replays from the database itself: no backlog, and the count comes after it
            last = await service.last_seq(conn.user_id)
            conn.start(min(since, last))  # a `since` from the future must not hide new messages
            await conn.catch_up()
        if conn.ended:
            return
        assert conn.gate is not None
        if since is not None or conn.gate.last != last:
            count = await service.unread_count_upto(conn.user_id, conn.gate.last)
        conn.push(frames.encode("message.synced", {"seq": conn.gate.last, "count": count}))
        conn.go_live()
        conn.expire_at(app[deadlines_key], expires_at, cfg.token_expiry_notice, keep=True)  # after the sync, unless refreshed
    except Exception:
        log.exception("initial sync of push connection %s failed", conn.id)
        conn.close_soon(CLOSE_SERVER_ERROR, "server error: reconnect with backoff")


async def _send_backlog(app: web.Application, conn: UserConnection, upto_seq: int, count: int,
                        first_page: list[dict[str, Any]], limit: int, bodies: frames.MessageBodies) -> None:
    """The unread messages up to `upto_seq` (`count` of them), oldest first, in frames of
    PAGE, at most `limit`; the first page came with the sync point. The next page is read
    only once the socket has room; nothing more once it closed."""
    service = app[message_service_key]
    frame_bytes_limit = app[config_key].push.backlog_frame_bytes
    sent = 0
    after: int | None = None
    while True:
        size = min(PAGE, limit - sent)
        if after is None:
            batch = first_page
        elif not await conn.room():
            return
        else:
            batch = await service.unread_rows(conn.user_id, size, after, upto_seq) if size > 0 else []
        sent += len(batch)
        done = len(batch) < size or sent >= limit
        if batch or not sent:
            chunks = bodies.message_unread_frames(batch, count, done and count > sent, frame_bytes_limit)
            for chunk in chunks:
                if not conn.fits(chunk) and not await conn.room(chunk):
                    return
                conn.push(chunk)
        if done:
            break
        after = batch[-1]["seq"]


async def _on_text(app: web.Application, conn: UserConnection, data: str) -> None:
    try:
        raw = decode_json(data)
    except DomainError as exc:
        conn.push(frames.error(exc.code, exc.message))
        return
    try:
        if not isinstance(raw, dict):
            raise ValidationError("A frame is a JSON object.")
        frame = CLIENT_FRAME.load(raw)
        if frame["type"] == "ping":
            conn.push(frames.encode("pong", {}))
        elif frame["type"] == "read":
            ids = READ_IN.load(frame["payload"])["ids"]
            await app[message_service_key].mark_read(conn.user_id, ids, strict=True)  # message.read reaches every device
        else:
            new_token = REFRESH_IN.load(frame["payload"])["token"]
            claims = await authenticate(app, new_token)
            if claims.user_id != conn.user_id:
                raise Unauthorized("That token is for another user.", code="wrong_user")
            conn.session_id = claims.session_id
            conn.expire_at(app[deadlines_key], claims.expires_at, app[config_key].push.token_expiry_notice)
            conn.push(frames.encode("token.refreshed", {"expires_at": claims.expires_at}))
    except ValidationError as exc:
        unknown = isinstance(raw, dict) and "type" in exc.normalized_messages() and "type" in raw
        code = "unknown_type" if unknown else "bad_frame"
        conn.push(frames.error(code, _describe(exc.normalized_messages())))
    except DomainError as exc:
        conn.push(frames.error(exc.code, exc.message))


def _describe(messages: Any, path: str = "") -> str:
    """marshmallow's nested messages as one line, e.g. `ids.0: Not a valid integer.`"""
    if isinstance(messages, dict):
        return " ".join(_describe(v, f"{path}.{k}".strip(".")) for k, v in messages.items())
    text = " ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
    return f"{path}: {text}" if path else text
