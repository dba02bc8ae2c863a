"""WebSocket frames: one envelope `{"type", "payload", "timestamp"}`, a schema per type.

Frames are encoded once and the same string is queued on every socket that
gets it; `encode` validates the payload by dumping it through its schema.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable

from marshmallow import Schema, fields

from .lru import SizedLRU
from .schemas import MessageBaseSchema, ReceiptSchema, ReceivedMessageSchema, SentMessageSchema


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


class ReceiptPayload(Schema):
    """Who read one of the sender's messages since the previous frame for it (coalesced
    over push.receipt_window), and the counts as committed when the frame was sent."""
    message_id = fields.Integer(required=True)
    read_count = fields.Integer(required=True)
    recipient_count = fields.Integer(required=True)
    readers = fields.List(fields.Nested(ReceiptSchema), required=True)


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
    "message.sent": SentMessageSchema,
    "message.receipt": ReceiptPayload,
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
_MESSAGE = MessageBaseSchema()  # a recipient's view without the reader's own fields
_READ_AT = _SCHEMAS["message.new"].fields["read_at"]


class EnvelopeSchema(Schema):
    type = fields.String(required=True, validate=lambda t: t in SERVER_FRAMES)
    payload = fields.Dict(required=True)
    timestamp = fields.AwareDateTime(required=True)


def encode(type_: str, payload: dict[str, Any]) -> str:
    body = {"type": type_, "payload": _SCHEMAS[type_].dump(payload), "timestamp": _now()}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class MessageBodies:
    """Each message's JSON, dumped through its schema once and kept (LRU, bounded in
    characters): a recipient's view of a message never changes (its content, its
    `recipient_count`), only the reader's `seq` and `read_at`, which are spliced in.
    A backlog of group messages is then encoded once per message, not once per
    message per member, and its size no longer grows with the group's (no ids)."""

    def __init__(self, max_chars: int = 16 * 1024 * 1024):
        self._bodies: SizedLRU[int, str] = SizedLRU(max_chars)

    def body(self, message: dict[str, Any]) -> str:
        """`{"id":...,...}` without the reader's fields."""
        body = self._bodies.get(message["id"])
        if body is None:
            body = json.dumps(_MESSAGE.dump(message), ensure_ascii=False, separators=(",", ":"))
            self._bodies.put(message["id"], body)
        return body

    def received(self, row: dict[str, Any]) -> str:
        """One row of a reader's view: the message with its `seq` and `read_at`."""
        read_at = _READ_AT.serialize("read_at", row)
        return f'{{"seq":{int(row["seq"])},"read_at":{"null" if read_at is None else json.dumps(read_at)},{self.body(row)[1:]}'

    def message_new(self, row: dict[str, Any]) -> str:
        return f'{{"type":"message.new","payload":{self.received(row)},"timestamp":"{_now()}"}}'

    def message_new_for(self, message: dict[str, Any]) -> Callable[[int], str]:
        """`message.new` of a message just stored (unread by all), for any recipient's seq:
        the body is encoded here once, and is then already kept for backlogs and catch-ups."""
        head = '{"type":"message.new","payload":{"seq":'
        tail = f',"read_at":null,{self.body(message)[1:]},"timestamp":"{_now()}"}}'
        return lambda seq: f"{head}{seq}{tail}"

    def message_unread_frames(self, rows: list[dict[str, Any]], count: int, has_more: bool, max_bytes: int) -> list[str]:
        """The page as one or more frames of at most about `max_bytes` each (a message is
        never split): 200 messages of 10,000 characters would be one 2 MB frame.
        `has_more` goes on the last frame only."""
        chunks: list[list[str]] = [[]]
        size = 0
        for row in rows:
            received = self.received(row)  # each row encoded once: sized, then joined
            body = len(received) if received.isascii() else len(received.encode())
            if chunks[-1] and size + body > max_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(received)
            size += body
        return [self._unread(chunk, count, has_more and i == len(chunks) - 1) for i, chunk in enumerate(chunks)]

    def message_unread(self, rows: list[dict[str, Any]], count: int, has_more: bool) -> str:
        return self._unread([self.received(row) for row in rows], count, has_more)

    def _unread(self, received: list[str], count: int, has_more: bool) -> str:
        messages = ",".join(received)
        payload = f'{{"messages":[{messages}],"count":{int(count)},"has_more":{"true" if has_more else "false"}}}'
        return f'{{"type":"message.unread","payload":{payload},"timestamp":"{_now()}"}}'


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def error(code: str, message: str) -> str:
    return encode("error", {"code": code, "message": message})


def validate_frame(raw: str) -> dict[str, Any]:
    """Test/tool helper: parse a server frame and check it against its schema."""
    frame = json.loads(raw)
    EnvelopeSchema().load(frame)
    _SCHEMAS[frame["type"]].load(frame["payload"])
    return frame

