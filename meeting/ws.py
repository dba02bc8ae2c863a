"""GET /ws/messages: every online device of a user gets each of its messages at once.

Connect sequence, gap-free and duplicate-free:
1. authenticate (HTTP 401 before any upgrade), upgrade, register in the map and
   subscribe on the broker (confirmed): from here every new message reaches us,
   and is held back until step 3;
2. `connected`; then, read from the database *after* step 1, either the unread
   backlog up to the user's last seq (`message.unread`), or with `?since=` every
   message after it (`message.new`);
3. `message.synced`, and live frames through the connection's SeqGate, which
   drops what was already sent and fills any gap from the database.
So a device sees every message exactly once, in seq order, whatever the broker did.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from . import frames
from .connection import (
    CLOSE_SERVER_ERROR, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG, CLOSE_TOO_MANY_CONNECTIONS, CLOSE_UNSUPPORTED, Connection,
)
from .errors import DomainError, Unauthorized
from .handlers.common import admit_websocket, authenticate, decode_json, doc, parse_query, public, websocket_token
from .schemas import Id, QueryInt
from .sequencing import SeqGate
from .typedefs import config_key, message_service_key, push_hub_key, sessions_key, stats_key

log = logging.getLogger(__name__)
PAGE = 200
Fetch = Callable[[int, int, int], Awaitable[list[dict[str, Any]]]]  # user id, after seq, limit
Item = tuple[str, "float | None"]  # an encoded frame and its message's commit time


class UserConnection(Connection):
    """A user's push socket: seq ordering, catch-up and token timers on top of the queue."""

    __slots__ = ("gate", "_live", "_early", "_fetch", "_encode", "_catching_up", "_timer")

    def __init__(self, ws: web.WebSocketResponse, user_id: int, queue_limit: int,
                 on_dead: Callable[[Connection], None] | None = None, fetch: Fetch | None = None,
                 stats: Any = None, encode: Callable[[dict[str, Any]], str] | None = None):
        super().__init__(ws, user_id, queue_limit, on_dead, stats)
        self.gate: SeqGate[Item] | None = None  # set when the initial sync starts
        self._live = False                      # until message.synced went out, broker frames wait
        self._early: list[tuple[int, Item]] = []
        self._fetch = fetch
        self._encode = encode or (lambda row: frames.encode("message.new", row))  # a stored row as message.new
        self._catching_up: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # token expiry: the notice, then the close

    def deliver(self, seq: int, frame: str, committed_at: float | None = None) -> None:
        """A frame from the broker. seq 0: not a message (read sync), sent as is."""
        if seq == 0:
            self.push(frame, committed_at)
        elif not self._live or self.gate is None:
            self._early.append((seq, (frame, committed_at)))
        else:
            for ready in self.gate.offer(seq, (frame, committed_at)):
                self.push(*ready)
            if self.gate.waiting:
                self.request_catch_up()

    def start(self, last_seq: int) -> None:
        """The device has (or is being sent) everything up to `last_seq`."""
        self.gate = SeqGate(last_seq)

    def go_live(self) -> None:
        """After message.synced: release what the broker brought meanwhile, in order."""
        assert self.gate is not None
        self._live = True
        early, self._early = self._early, []
        for seq, item in early:
            for ready in self.gate.offer(seq, item):
                self.push(*ready)
        if self.gate.waiting:
            self.request_catch_up()

    def request_catch_up(self) -> None:
        if self.gate is not None and not self.closed and (self._catching_up is None or self._catching_up.done()):
            self._catching_up = asyncio.create_task(self._catch_up_or_close(), name=f"ws-catchup-{self.id}")

    async def catch_up(self) -> None:
        """Send, in seq order, everything stored after what this device has."""
        assert self.gate is not None and self._fetch is not None
        while True:
            rows = await self._fetch(self.user_id, self.gate.last, PAGE)
            for row in rows:
                if row["seq"] > self.gate.last:
                    for ready in self.gate.offer(row["seq"], (self._encode(row), None)):
                        self.push(*ready)
            if len(rows) < PAGE:
                return

    async def _catch_up_or_close(self) -> None:
        try:
            await self.catch_up()
        except Exception:
            log.exception("catch-up of connection %s failed", self.id)
            self.close_soon(CLOSE_SERVER_ERROR, "server error: reconnect with backoff")

    async def stop(self) -> None:
        if self._catching_up is not None:
            self._catching_up.cancel()
        await super().stop()

    def expire_at(self, expires_at: dt.datetime, notice: float) -> None:
        """One timer at a time per connection (ten thousand of them): the notice, which
        then sets the close."""
        self.cancel_timers()
        remaining = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, remaining - notice), self._expiring, expires_at)

    def _expiring(self, expires_at: dt.datetime) -> None:
        self.push(frames.encode("token.expiring", {"expires_at": expires_at}))
        remaining = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, remaining), self.close_soon, CLOSE_TOKEN_EXPIRED, "token expired")

    def cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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


@doc("Real-time push WebSocket (upgrade); see docs/websocket.md", response=(101, None), errors=(401, 403, 429), tag="push")
@public  # authenticates itself: browsers cannot set headers on a WebSocket
async def messages_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    token = websocket_token(request)
    if token is None:
        raise Unauthorized("A token is required (`bearer` subprotocol, Authorization header or `token` query).", code="missing_token")
    claims = await authenticate(app, token)
    await admit_websocket(request, claims.user_id)
    since = parse_query(request, CONNECT_QUERY)["since"]
    cfg = app[config_key].push
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat, max_msg_size=cfg.max_frame_size, protocols=("bearer",),
                               compress=cfg.compress)
    await ws.prepare(request)
    hub = app[push_hub_key]
    service = app[message_service_key]
    stats = app[stats_key]
    conn = UserConnection(ws, claims.user_id, cfg.queue_limit, on_dead=hub.unregister,
                          fetch=service.received_after_seq, stats=stats, encode=hub.bodies.message_new)
    conn.session_id = claims.session_id
    if not await hub.register(conn):
        await conn.close(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
        await conn.stop()
        return ws
    if app[sessions_key].is_revoked(conn.session_id):  # logged out while we were connecting: the
        conn.close_soon(CLOSE_TOKEN_EXPIRED, "logged out")  # revocation's listeners did not see us yet
    try:
        await hub.broker.want(conn.user_id)
        conn.push(frames.encode("connected", {"user_id": conn.user_id, "connection_id": conn.id, "heartbeat": cfg.heartbeat}))
        limit = cfg.backlog_limit
        # A resume (`since`) replays from the database itself: it needs no backlog page.
        last, count, first_page = await service.sync_point(conn.user_id, min(PAGE, limit) if since is None else 0)
        if since is None:
            await _send_backlog(app, conn, last, count, first_page, limit, hub.bodies)
            conn.start(last)
        else:
            conn.start(min(since, last))  # a `since` from the future must not hide new messages
            await conn.catch_up()
        assert conn.gate is not None
        if conn.gate.last != last:
            count = await service.unread_count_upto(conn.user_id, conn.gate.last)
        conn.push(frames.encode("message.synced", {"seq": conn.gate.last, "count": count}))
        conn.go_live()
        conn.expire_at(claims.expires_at, cfg.token_expiry_notice)  # after the sync: connected, backlog, then anything
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
        await conn.stop()
    return ws


async def _send_backlog(app: web.Application, conn: UserConnection, upto_seq: int, count: int,
                        first_page: list[dict[str, Any]], limit: int, bodies: frames.MessageBodies) -> None:
    """The unread messages up to `upto_seq` (`count` of them), oldest first, in frames of
    PAGE, at most `limit`; the first page came with the sync point."""
    service = app[message_service_key]
    sent = 0
    after: int | None = None
    while True:
        size = min(PAGE, limit - sent)
        if after is None:
            batch = first_page
        else:
            batch = await service.unread_rows(conn.user_id, size, after, upto_seq) if size > 0 else []
        sent += len(batch)
        done = len(batch) < size or sent >= limit
        if batch or not sent:
            conn.push(bodies.message_unread(batch, count, done and count > sent))
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
            conn.expire_at(claims.expires_at, app[config_key].push.token_expiry_notice)
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
