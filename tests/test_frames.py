"""Frames encoded by splicing cached message bodies are exactly what the schemas dump."""

from __future__ import annotations

import datetime as dt
import json

from meeting import frames
from meeting.schemas import ReceivedMessageSchema, SentMessageSchema


def _row(message_id: int, seq: int, read_at: dt.datetime | None = None, content: str = "会议 at 10 🚀") -> dict:
    return {"id": message_id, "sender_id": 1, "recipient_ids": (2, 3), "recipient_count": 2, "content": content, "type": "text",
            "meeting_id": None, "created_at": dt.datetime(2026, 11, 28, 9, 30, tzinfo=dt.timezone.utc),
            "read_at": read_at, "seq": seq}


def test_a_spliced_row_equals_the_schema_dump_read_or_not() -> None:
    bodies = frames.MessageBodies()
    read = dt.datetime(2026, 11, 28, 10, 0, 1, 250000, tzinfo=dt.timezone.utc)
    for row in (_row(7, 3), _row(7, 4, read_at=read)):  # the second reuses the first's body
        assert json.loads(bodies.received(row)) == ReceivedMessageSchema().dump(row)


def test_unread_and_new_frames_validate_against_their_schemas() -> None:
    bodies = frames.MessageBodies()
    rows = [_row(1, 1), _row(2, 2, content='quotes " and \\ backslashes')]
    unread = frames.validate_frame(bodies.message_unread(rows, 5, True))
    assert unread["type"] == "message.unread"
    assert unread["payload"]["count"] == 5 and unread["payload"]["has_more"] is True
    assert [m["seq"] for m in unread["payload"]["messages"]] == [1, 2]
    assert unread["payload"]["messages"][1]["content"] == 'quotes " and \\ backslashes'
    assert frames.validate_frame(bodies.message_unread([], 0, False))["payload"] == {"messages": [], "count": 0, "has_more": False}
    new = frames.validate_frame(bodies.message_new(_row(9, 12)))
    assert new["type"] == "message.new" and new["payload"]["seq"] == 12 and new["payload"]["read_at"] is None


def test_a_live_frame_is_the_schema_dump_and_its_body_is_kept_for_backlogs() -> None:
    bodies = frames.MessageBodies()
    message = {k: v for k, v in _row(5, 0).items() if k not in ("read_at", "seq")}
    frame_for = bodies.message_new_for(message)
    for seq in (1, 42):
        live = frames.validate_frame(frame_for(seq))
        assert live["type"] == "message.new"
        assert live["payload"] == ReceivedMessageSchema().dump({**message, "read_at": None, "seq": seq})
    assert 5 in bodies._bodies  # a reconnecting reader's backlog reuses it
    assert "recipient_ids" not in live["payload"] and live["payload"]["recipient_count"] == 2  # the recipient's view


def test_the_senders_frames_validate_against_their_schemas() -> None:
    message = {k: v for k, v in _row(5, 0).items() if k not in ("read_at", "seq")} | {"read_count": 0}
    sent = frames.validate_frame(frames.encode("message.sent", message))
    assert sent["payload"] == SentMessageSchema().dump(message)
    assert sent["payload"]["recipient_ids"] == [2, 3] and "seq" not in sent["payload"] and "read_at" not in sent["payload"]
    read_at = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.timezone.utc)
    receipt = frames.validate_frame(frames.encode("message.receipt", {
        "message_id": 5, "read_count": 1, "recipient_count": 2, "readers": [{"user_id": 3, "read_at": read_at}]}))
    assert receipt["payload"] == {"message_id": 5, "read_count": 1, "recipient_count": 2,
                                  "readers": [{"user_id": 3, "read_at": "2026-11-28T10:00:00+00:00"}]}


def test_bodies_are_bounded_least_recently_used_out() -> None:
    one = len(frames.MessageBodies().body(_row(1, 1)))
    bodies = frames.MessageBodies(max_chars=2 * one)
    for message_id in (1, 2):
        bodies.body(_row(message_id, 1))
    bodies.body(_row(1, 1))  # 1 is now the most recent
    bodies.body(_row(3, 1))  # so 2 goes
    assert bodies._bodies.keys() == [1, 3]
