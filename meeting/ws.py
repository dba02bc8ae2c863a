"""GET /ws/messages: every online device of a user gets each of its messages at once.

Connect sequence, gap-free and duplicate-free:
1. authenticate (HTTP 401 before any upgrade), upgrade, register in the map in
   *syncing* mode: live messages are held back, not sent;
2. `connected`; then the unread backlog read from the database *after*
   registering, as `message.unread` frames;
3. the held-back live messages, minus those already in the backlog; then live.
A message committed while this runs is in the backlog, or held back, or both
(and then sent once): never neither, never twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web
from marshmallow import Schema, ValidationError, fields, validate

from . import frames
from .connection import (
    CLOSE_SERVER_ERROR, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG, CLOSE_TOO_MANY_CONNECTIONS, CLOSE_UNSUPPORTED, Connection,
)
from .errors import DomainError, Unauthorized
from .handlers.common import doc, public, websocket_token
from .schemas import Id
from .typedefs import config_key, message_service_key, push_hub_key, tokens_key

log = logging.getLogger(__name__)
BACKLOG_FRAME = 200


class UserConnection(Connection):
    """A user's push socket: sync state and token-expiry timers on top of the queue."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.syncing = True
        self._held: list[tuple[int, str]] = []
        self._timers: list[asyncio.TimerHandle] = []

    def deliver(self, message_id: int, frame: str) -> None:
        if self.syncing:
            self._held.append((message_id, frame))
        else:
            self.push(frame)

    def finish_sync(self, already_sent: set[int]) -> None:
        held, self._held, self.syncing = self._held, [], False
        for message_id, frame in held:
            if message_id not in already_sent:
                self.push(frame)

    def expire_at(self, expires_at: dt.datetime, notice: float) -> None:
        self.cancel_timers()
        loop = asyncio.get_running_loop()
        remaining = (expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        warning = frames.encode("token.expiring", {"expires_at": expires_at})
        self._timers = [loop.call_later(max(0.0, remaining - notice), self.push, warning),
                        loop.call_later(max(0.0, remaining), self.close_soon, CLOSE_TOKEN_EXPIRED, "token expired")]

    def cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []


class ClientFrame(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["ping", "read", "refresh"]))
    payload = fields.Dict(load_default=dict)


class ReadIn(Schema):
    ids = fields.List(Id(), required=True, validate=validate.Length(1, 1000))


class RefreshIn(Schema):
    token = fields.String(required=True)


@doc("Real-time push WebSocket (upgrade); see docs/websocket.md", response=(101, None), errors=(401,), tag="push")
@public  # authenticates itself: browsers cannot set headers on a WebSocket
async def messages_ws(request: web.Request) -> web.StreamResponse:
    app = request.app
    token = websocket_token(request)
    if token is None:
        raise Unauthorized("A token is required (`bearer` subprotocol, Authorization header or `token` query).", code="missing_token")
    claims = app[tokens_key].decode(token)
    cfg = app[config_key].push
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat, max_msg_size=cfg.max_frame_size, protocols=("bearer",))
    await ws.prepare(request)
    hub = app[push_hub_key]
    conn = UserConnection(ws, claims.user_id, cfg.queue_limit, on_dead=hub.unregister)
    if not hub.register(conn):
        await conn.close(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
        await conn.stop()
        return ws
    try:
        conn.push(frames.encode("connected", {"user_id": conn.user_id, "connection_id": conn.id, "heartbeat": cfg.heartbeat}))
        await _send_backlog(app, conn)
        conn.expire_at(claims.expires_at, cfg.token_expiry_notice)  # after the backlog: connected, backlog, then anything
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
        conn.cancel_timers()
        await conn.stop()
    return ws


async def _send_backlog(app: web.Application, conn: UserConnection) -> None:
    service = app[message_service_key]
    limit = app[config_key].push.backlog_limit
    sent: set[int] = set()
    after: int | None = None
    while True:
        size = min(BACKLOG_FRAME, limit - len(sent))
        page = await service.unread(conn.user_id, limit=size, after_seq=after) if size > 0 else {"messages": [], "count": await service.unread_count(conn.user_id)}
        batch = page["messages"]
        sent.update(m["id"] for m in batch)
        done = len(batch) < size or len(sent) >= limit
        truncated = done and page["count"] > len(sent)
        if batch or not sent:
            conn.push(frames.encode("message.unread", {"messages": batch, "count": page["count"], "has_more": truncated}))
        if done:
            break
        after = batch[-1]["seq"]
    conn.finish_sync(sent)


async def _on_text(app: web.Application, conn: UserConnection, data: str) -> None:
    try:
        raw = json.loads(data)
    except ValueError:
        conn.push(frames.error("invalid_json", "The frame is not valid JSON."))
        return
    try:
        if not isinstance(raw, dict):
            raise ValidationError("A frame is a JSON object.")
        frame = ClientFrame().load(raw)
        if frame["type"] == "ping":
            conn.push(frames.encode("pong", {}))
        elif frame["type"] == "read":
            ids = ReadIn().load(frame["payload"])["ids"]
            await app[message_service_key].mark_read(conn.user_id, ids, strict=True)  # message.read reaches every device
        else:
            new_token = RefreshIn().load(frame["payload"])["token"]
            claims = app[tokens_key].decode(new_token)
            if claims.user_id != conn.user_id:
                raise Unauthorized("That token is for another user.", code="wrong_user")
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
