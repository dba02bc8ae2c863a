"""The messages REST API on both backends, with Redis off, on, and configured but down."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from meeting.config import Config, with_overrides
from meeting.typedefs import message_service_key, tokens_key
from tests.helpers import Api, User


@pytest.fixture
def config(config: Config, redis_mode: dict[str, Any]) -> Config:
    return with_overrides(config, redis=redis_mode)


async def test_multi_recipient_send_and_each_recipients_view(api: Api) -> None:
    alice, bob, carol, dave = await api.users(4)
    sent = await api.send(alice, [bob, carol, bob], "多人消息 🚀")
    # the sender's view: who received it, how many read it
    assert set(sent) == {"id", "sender_id", "recipient_ids", "recipient_count", "read_count", "content", "type",
                         "meeting_id", "created_at"}
    assert sent["sender_id"] == alice.id and sent["type"] == "text" and sent["meeting_id"] is None
    assert sent["recipient_ids"] == sorted([bob.id, carol.id]) and sent["recipient_count"] == 2 and sent["read_count"] == 0
    assert dt.datetime.fromisoformat(sent["created_at"]).utcoffset() == dt.timedelta(0)
    for user in (bob, carol):
        inbox = await api.call("GET", "/messages", user=user, expect=200)
        assert [m["id"] for m in inbox["messages"]] == [sent["id"]]
        # a recipient's view: how many, not who
        assert set(inbox["messages"][0]) == {"id", "sender_id", "recipient_count", "content", "type", "meeting_id",
                                             "created_at", "read_at", "seq"}
        assert inbox["messages"][0]["recipient_count"] == 2
        one = await api.call("GET", f"/messages/{sent['id']}", user=user, expect=200)
        assert "recipient_ids" not in one and one["recipient_count"] == 2 and one["seq"] == 1
        assert inbox["messages"][0]["content"] == "多人消息 🚀" and inbox["messages"][0]["read_at"] is None
        assert inbox["next_before"] is None
        assert await api.unread_count(user) == 1
    assert (await api.call("GET", "/messages", user=dave, expect=200))["messages"] == []
    assert [m["id"] for m in (await api.call("GET", "/messages/sent", user=alice, expect=200))["messages"]] == [sent["id"]]
    assert (await api.call("GET", f"/messages/{sent['id']}", user=alice, expect=200))["recipient_ids"] == sent["recipient_ids"]


async def test_unread_count_across_send_read_one_many_all(api: Api) -> None:
    alice, bob = await api.users(2)
    ids = [(await api.send(alice, [bob], f"m{i}"))["id"] for i in range(5)]
    assert await api.unread_count(bob) == 5
    unread = await api.call("GET", "/messages/unread", user=bob, expect=200)
    assert [m["id"] for m in unread["messages"]] == ids and unread["count"] == 5  # oldest first

    first = await api.call("POST", f"/messages/{ids[0]}/read", user=bob, expect=200)
    assert first["id"] == ids[0] and first["read_at"] is not None
    again = await api.call("POST", f"/messages/{ids[0]}/read", user=bob, expect=200)
    assert again == first  # idempotent: keeps the first read_at
    assert await api.unread_count(bob) == 4

    many = await api.call("POST", "/messages/read", user=bob, json={"ids": ids[1:3] + [ids[0]]}, expect=200)
    assert many == {"updated": 2, "count": 2}
    assert [m["id"] for m in (await api.call("GET", "/messages/unread", user=bob, expect=200))["messages"]] == ids[3:]

    everything = await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    assert everything == {"updated": 2, "count": 0}
    assert await api.unread_count(bob) == 0
    inbox = await api.call("GET", "/messages", user=bob, expect=200)
    assert all(m["read_at"] is not None for m in inbox["messages"])


async def test_received_and_sent_pagination_boundaries(api: Api) -> None:
    alice, bob = await api.users(2)
    ids = [(await api.send(alice, [bob], f"m{i}"))["id"] for i in range(5)]
    page1 = await api.call("GET", "/messages", user=bob, params={"limit": "2"}, expect=200)
    assert [m["id"] for m in page1["messages"]] == ids[:-3:-1] and page1["next_before"] == ids[3]
    page2 = await api.call("GET", "/messages", user=bob, params={"limit": "2", "before": str(page1["next_before"])}, expect=200)
    assert [m["id"] for m in page2["messages"]] == [ids[2], ids[1]] and page2["next_before"] == ids[1]
    page3 = await api.call("GET", "/messages", user=bob, params={"limit": "2", "before": str(page2["next_before"])}, expect=200)
    assert [m["id"] for m in page3["messages"]] == [ids[0]] and page3["next_before"] is None
    exact = await api.call("GET", "/messages/sent", user=alice, params={"limit": "5"}, expect=200)
    assert [m["id"] for m in exact["messages"]] == ids[::-1] and exact["next_before"] is None
    assert (await api.call("GET", "/messages", user=bob, params={"before": str(ids[0])}, expect=200))["messages"] == []
    for bad in ({"limit": "0"}, {"limit": "101"}, {"before": "0"}, {"before": "x"}):
        await api.call("GET", "/messages", user=bob, params=bad, expect=422)
    limited = await api.call("GET", "/messages/unread", user=bob, params={"limit": "2"}, expect=200)
    assert [m["id"] for m in limited["messages"]] == ids[:2] and limited["count"] == 5


async def test_nobody_sees_reads_or_marks_others_messages(api: Api) -> None:
    alice, bob, eve = await api.users(3)
    message = await api.send(alice, [bob])
    for method, path in (("GET", f"/messages/{message['id']}"), ("POST", f"/messages/{message['id']}/read"),
                         ("GET", "/messages/987654321"), ("POST", "/messages/987654321/read")):
        body = await api.call(method, path, user=eve, expect=404)
        assert body["error"]["code"] == "not_found"
    # the sender can see it but is not a recipient, so cannot mark it read
    await api.call("POST", f"/messages/{message['id']}/read", user=alice, expect=404)
    assert await api.call("POST", "/messages/read", user=eve, json={"ids": [message["id"]]}, expect=200) == {"updated": 0, "count": 0}
    assert await api.unread_count(bob) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"recipient_ids": ["BOB"], "content": "x"}, "recipient_ids"),
        ({"recipient_ids": [], "content": "x"}, "recipient_ids"),
        ({"recipient_ids": "1", "content": "x"}, "recipient_ids"),
        ({"recipient_ids": [2**70], "content": "x"}, "recipient_ids"),
        ({"recipient_ids": "BOB", "content": ""}, "content"),
        ({"content": "x"}, "recipient_ids"),
        ({"recipient_ids": "BOB"}, "content"),
        ({"recipient_ids": "BOB", "content": "   \n\t"}, "content"),
        ({"recipient_ids": "BOB", "content": "x" * 10_001}, "content"),
        ({"recipient_ids": "BOB", "content": 5}, "content"),
        ({"recipient_ids": "BOB", "content": "x", "meeting_id": "1"}, "meeting_id"),
        ({"recipient_ids": list(range(1, 1002)), "content": "x"}, "recipient_ids"),
        ({"recipient_ids": [987654], "content": "x"}, "recipient_ids"),
    ],
)
async def test_send_validation_is_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    alice, bob = await api.users(2)
    if body.get("recipient_ids") == "BOB":
        body = {**body, "recipient_ids": [bob.id]}
    error = (await api.call("POST", "/messages", user=alice, json=body, expect=422))["error"]
    assert error["code"] == "validation_error" and field in error["details"]
    assert await api.unread_count(bob) == 0


async def test_unknown_recipients_are_named_and_nothing_is_stored(api: Api) -> None:
    alice, bob = await api.users(2)
    error = (await api.call("POST", "/messages", user=alice, json={"recipient_ids": [bob.id, 999998, 999999], "content": "x"}, expect=422))["error"]
    assert error["details"]["unknown_ids"] == [999998, 999999]
    assert await api.unread_count(bob) == 0 and (await api.call("GET", "/messages/sent", user=alice))["messages"] == []


async def test_missing_or_bad_body_and_no_token(api: Api) -> None:
    alice = await api.user()
    await api.call("POST", "/messages", user=alice, expect=400)
    await api.call("POST", "/messages", user=alice, data="[", headers={"Content-Type": "application/json"}, expect=400)
    await api.call("POST", "/messages", json={"recipient_ids": [alice.id], "content": "x"}, expect=401)
    await api.call("POST", "/messages/read", user=alice, json={}, expect=422)
    await api.call("POST", "/messages/read", user=alice, json={"ids": [1], "all": True}, expect=422)
    await api.call("POST", "/messages/read", user=alice, json={"all": False}, expect=422)


async def test_exactly_1000_recipients_is_accepted(api: Api) -> None:
    sender = await api.user()
    import sqlalchemy as sa

    from meeting.db import users
    from meeting.typedefs import engine_key

    engine = api.client.app[engine_key] if api.client.app else None
    assert engine is not None
    now = dt.datetime.now(dt.timezone.utc)
    async with engine.begin() as conn:
        await conn.execute(users.insert(), [{"username": f"bulk{i}", "display_name": "b", "password_hash": "x", "created_at": now} for i in range(1000)])
        ids = list((await conn.execute(sa.select(users.c.id).where(users.c.username.startswith("bulk")))).scalars())
    message = await api.call("POST", "/messages", user=sender, json={"recipient_ids": ids, "content": "all hands"}, expect=201)
    assert len(message["recipient_ids"]) == 1000


async def test_concurrent_sends_to_one_user_keep_the_count_exact(api: Api) -> None:
    senders = await api.users(4)
    target = await api.user()
    await api.unread_count(target)  # warm the cache where there is one
    await asyncio.gather(*[api.send(s, [target], f"{s.id}-{i}") for s in senders for i in range(5)])
    assert await api.unread_count(target) == 20
    unread = await api.call("GET", "/messages/unread", user=target)
    assert unread["count"] == 20 and len({m["id"] for m in unread["messages"]}) == 20


async def test_cache_never_serves_stale_data_in_tight_sequences(api: Api) -> None:
    alice, bob = await api.users(2)
    expected = 0
    ids: list[int] = []
    for round_ in range(6):
        ids.append((await api.send(alice, [bob], f"r{round_}"))["id"])
        expected += 1
        assert await api.unread_count(bob) == expected
        inbox = await api.call("GET", "/messages", user=bob)
        assert inbox["messages"][0]["id"] == ids[-1] and inbox["messages"][0]["read_at"] is None
        if round_ % 2:
            await api.call("POST", f"/messages/{ids[-1]}/read", user=bob, expect=200)
            expected -= 1
            assert await api.unread_count(bob) == expected
            assert (await api.call("GET", "/messages", user=bob))["messages"][0]["read_at"] is not None
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    assert await api.unread_count(bob) == 0
    assert all(m["read_at"] for m in (await api.call("GET", "/messages", user=bob))["messages"])


async def test_concurrent_sends_share_transactions_and_each_gets_its_own_answer(api: Api) -> None:
    """Group commit: refused sends in a shared transaction fail alone, take no seq,
    and the accepted ones reach each recipient with dense seqs in commit order."""
    alice, bob, carol = await api.users(3)
    ghost = User(987654321, "ghost", api.client.app[tokens_key].issue(987654321, 1))  # a token outliving its user
    bodies = [(alice, {"recipient_ids": [bob.id, carol.id] + ([999999] if i % 5 == 4 else []), "content": f"m{i}"})
              for i in range(40)] + [(ghost, {"recipient_ids": [bob.id], "content": "from nowhere"})]
    writer = api.client.app[message_service_key].writer
    batches_before = writer.batches
    answers = await asyncio.gather(*[api.client.post("/messages", json=b, headers=u.headers) for u, b in bodies])
    statuses = [a.status for a in answers]
    assert statuses == [422 if i % 5 == 4 else 201 for i in range(40)] + [401]
    assert (await answers[4].json())["error"]["details"]["unknown_ids"] == [999999]
    assert (await answers[-1].json())["error"]["code"] == "token_revoked"  # no such login: refused at the door
    assert writer.batches - batches_before < len(bodies), "concurrent sends were not combined"
    stored = [await a.json() for a in answers if a.status == 201]
    for user in (bob, carol):
        caught_up = (await api.call("GET", "/messages?after_seq=0&limit=100", user=user, expect=200))["messages"]
        assert [m["seq"] for m in caught_up] == list(range(1, len(stored) + 1))
        assert sorted(m["id"] for m in caught_up) == sorted(m["id"] for m in stored)
        assert [m["id"] for m in caught_up] == sorted(m["id"] for m in caught_up)  # seq order is commit (id) order
        assert await api.unread_count(user) == len(stored)


async def test_a_received_page_always_has_both_cursors(api: Api) -> None:
    """The document lists every field of a response as required (tests/test_fuzz_api.py
    holds responses to it): the cursor a page does not use is null, not missing."""
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    newest = await api.call("GET", "/messages", user=bob, expect=200)
    oldest = await api.call("GET", "/messages", user=bob, params={"after_seq": "0"}, expect=200)
    for page in (newest, oldest):
        assert (page["next_before"], page["next_after_seq"], len(page["messages"])) == (None, None, 1)
