"""WebSocket frames: one envelope `{"type", "payload", "timestamp"}`, a schema per type.

Frames are encoded once and the same string is queued on every socket that
gets it; `encode` validates the payload by dumping it through its schema.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable

from marshmallow import Schema, fields

from .schemas import ReceivedMessageSchema


class UserIdPayload(Schema):
    user_id = fields.Integer(required=True)


class ChatPayload(Schema):
    user_id = fields.Integer(required=True)
    text = fields.String(required=True)


class ErrorPayload(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)


class ConnectedPayload(Schema):
    user_id = fields.Integer(required=True)
    connection_id = fields.String(required=True)
    heartbeat = fields.Float(required=True)


class UnreadPayload(Schema):
    messages = fields.List(fields.Nested(ReceivedMessageSchema), required=True)
    count = fields.Integer(required=True)
    has_more = fields.Boolean(required=True)


class ReadPayload(Schema):
    ids = fields.List(fields.Integer(), required=True)
    count = fields.Integer(required=True)


class EmptyPayload(Schema):
    pass


class SyncedPayload(Schema):
    seq = fields.Integer(required=True)
    count = fields.Integer(required=True)


class ExpiringPayload(Schema):
    expires_at = fields.AwareDateTime(required=True)


#: Every server -> client frame type and the schema of its payload.
SERVER_FRAMES: dict[str, type[Schema]] = {
    "connected": ConnectedPayload,
    "message.unread": UnreadPayload,
    "message.new": ReceivedMessageSchema,
    "message.read": ReadPayload,
    "message.synced": SyncedPayload,
    "pong": EmptyPayload,
    "token.expiring": ExpiringPayload,
    "token.refreshed": ExpiringPayload,
    "meeting.joined": UserIdPayload,
    "meeting.left": UserIdPayload,
    "meeting.chat": ChatPayload,
    "error": ErrorPayload,
}
_SCHEMAS = {name: cls() for name, cls in SERVER_FRAMES.items()}


class EnvelopeSchema(Schema):
    type = fields.String(required=True, validate=lambda t: t in SERVER_FRAMES)
    payload = fields.Dict(required=True)
    timestamp = fields.AwareDateTime(required=True)


def encode(type_: str, payload: dict[str, Any]) -> str:
    body = {"type": type_, "payload": _SCHEMAS[type_].dump(payload),
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat()}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def message_new(message: dict[str, Any]) -> Callable[[int], str]:
    """`message.new` for one message, encoded once; each recipient's `seq` is spliced in."""
    body = json.dumps(_SCHEMAS["message.new"].dump({**message, "read_at": None}), ensure_ascii=False, separators=(",", ":"))
    head = '{"type":"message.new","payload":{"seq":'
    tail = f',{body[1:]},"timestamp":"{dt.datetime.now(dt.timezone.utc).isoformat()}"}}'
    return lambda seq: f"{head}{seq}{tail}"


def error(code: str, message: str) -> str:
    return encode("error", {"code": code, "message": message})


def validate_frame(raw: str) -> dict[str, Any]:
    """Test/tool helper: parse a server frame and check it against its schema."""
    frame = json.loads(raw)
    EnvelopeSchema().load(frame)
    _SCHEMAS[frame["type"]].load(frame["payload"])
    return frame

