"""GET /ws/meetings/{id}: the meeting-room WebSocket (join, chat, leave), one room across instances."""

from __future__ import annotations

import logging

from aiohttp import WSMsgType, web
from marshmallow import Schema, ValidationError, fields, validate

from .. import frames
from ..auth import TokenClaims
from ..connection import (
    CLOSE_POLICY_VIOLATION, CLOSE_TIMEOUT, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG, CLOSE_TOO_MANY_CONNECTIONS, CLOSE_UNSUPPORTED,
    Connection, accept,
)
from ..errors import DomainError, Forbidden, TooManyRequests, Unauthorized
from ..ratelimit import RateLimits
from ..rooms import RoomManager
from ..schemas import NOT_BLANK
from ..typedefs import config_key, deadlines_key, limits_key, meeting_service_key, rooms_key, sessions_key
from .common import admit_websocket, authenticate, decode_json, doc, path_id, public, websocket_token

log = logging.getLogger(__name__)


class ChatIn(Schema):
    text = fields.String(required=True, validate=[validate.Length(1, 2000), NOT_BLANK])


CHAT_IN = ChatIn()


async def _claims(request: web.Request) -> TokenClaims:
    """401 before the upgrade for a missing, bad or revoked token."""
    token = websocket_token(request)
    if token is None:
        raise Unauthorized("A token is required (query `token`, Authorization header or `bearer` subprotocol).", code="missing_token")
    return await authenticate(request.app, token)


@doc("Meeting-room WebSocket (upgrade); token in `token` query, Authorization header or `bearer` subprotocol", response=(101, None),
     errors=(400, 401, 403, 429), tag="meetings")  # 400: not an upgrade request
@public  # authenticates itself: browsers cannot set headers on a WebSocket
async def room(request: web.Request) -> web.StreamResponse:
    claims = await _claims(request)
    user_id = claims.user_id
    await admit_websocket(request, user_id)
    meeting_id = path_id(request)
    if not await request.app[meeting_service_key].is_participant(user_id, meeting_id):
        raise Forbidden("Only participants may join this meeting's room.", code="not_a_participant")
    cfg = request.app[config_key].push
    ws = web.WebSocketResponse(heartbeat=cfg.heartbeat, max_msg_size=cfg.max_frame_size, protocols=("bearer",),
                               compress=cfg.compress)
    await accept(ws, request)
    rooms = request.app[rooms_key]
    conn = Connection(ws, user_id, cfg.queue_limit, queue_bytes=cfg.queue_bytes)
    conn.session_id = claims.session_id
    if not rooms.join(meeting_id, conn, cfg.max_connections_per_user):
        await conn.close(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
        await conn.stop()
        return ws
    if request.app[sessions_key].is_revoked(conn.session_id):  # logged out while we were connecting
        conn.close_soon(CLOSE_TOKEN_EXPIRED, "logged out")
    conn.expire_at(request.app[deadlines_key], claims.expires_at, cfg.token_expiry_notice)  # token.expiring, then 4001, as on /ws/messages
    limits = request.app[limits_key]
    strikes = 0  # frames refused in a row for the chat rate limit
    try:
        await rooms.follow(meeting_id)  # hear the other instances before they hear of us
        rooms.broadcast(meeting_id, frames.encode("meeting.joined", {"user_id": user_id}), exclude=conn)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    await _on_text(rooms, limits, meeting_id, conn, msg.data)
                    strikes = 0
                except TooManyRequests as exc:
                    conn.push(frames.error(exc.code, f"{exc.message} Wait {exc.retry_after} s."))
                    strikes += 1
                    if strikes >= request.app[config_key].limits.strikes:
                        await conn.flush_and_close(CLOSE_POLICY_VIOLATION, "rate limit: too many frames", CLOSE_TIMEOUT)
            elif msg.type == WSMsgType.BINARY:
                await conn.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
            elif msg.type == WSMsgType.ERROR:
                if ws.close_code == CLOSE_TOO_BIG:
                    break
                log.debug("room socket error: %s", ws.exception())
    finally:
        # Synchronous clean-up first: with handler cancellation the first await may be the last.
        rooms.leave(meeting_id, conn)
        rooms.broadcast(meeting_id, frames.encode("meeting.left", {"user_id": user_id}))
        conn.cancel_timers()
        await conn.stop()
    return ws


async def _on_text(rooms: RoomManager, limits: RateLimits, meeting_id: int, conn: Connection, data: str) -> None:
    try:
        frame = decode_json(data)
        if not isinstance(frame, dict) or frame.get("type") != "meeting.chat":
            raise ValueError("expected {\"type\": \"meeting.chat\", \"payload\": {\"text\": ...}}")
        text = CHAT_IN.load(frame.get("payload") or {})["text"]
    except DomainError as exc:  # not JSON, too deep, not valid Unicode
        conn.push(frames.error(exc.code, exc.message))
        return
    except (ValueError, ValidationError) as exc:
        conn.push(frames.error("bad_frame", str(exc)))
        return
    await limits.hit("chat_per_connection", conn.id, shared=False)  # the socket lives here: so does its count
    rooms.broadcast(meeting_id, frames.encode("meeting.chat", {"user_id": conn.user_id, "text": text}))
