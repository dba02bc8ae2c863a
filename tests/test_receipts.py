"""The sender's view: the sent box, receipts, message.sent and live message.receipt frames.

Over real HTTP and WebSockets, on SQLite and MariaDB, with and without Redis; the
cross-instance cases (two apps sharing MariaDB and Redis) are at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from meeting.config import Config, with_overrides
from meeting.db import create_engine, message_recipients, messages, migrate
from meeting.receipts import ReceiptCoalescer
from meeting.typedefs import engine_key, message_service_key, push_hub_key, stats_key
from meeting.web import create_app
from tests.conftest import _clean_mariadb, _mysql_connect, base_config
from tests.helpers import Api, Device, Held, User, until
from tests.test_stream import stalled_device, tight_client  # noqa: F401 - a fixture

SENT_VIEW = {"id", "sender_id", "recipient_ids", "recipient_count", "read_count", "content", "type", "meeting_id", "created_at"}
RECEIVED_VIEW = {"id", "sender_id", "recipient_count", "content", "type", "meeting_id", "created_at", "read_at", "seq"}


@pytest.fixture
def config(config: Config, redis_mode: dict[str, Any]) -> Config:
    return with_overrides(config, redis=redis_mode, push={"receipt_window": 0.0})


def json_payload(frame: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(frame)["payload"]
    return payload


async def read(api: Api, user: User, message_id: int) -> None:
    await api.call("POST", f"/messages/{message_id}/read", user=user, expect=200)


async def test_the_sent_box_pages_like_the_inbox_and_its_counts_are_never_stale(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    ids = [(await api.send(alice, [bob, carol], f"notice {i}"))["id"] for i in range(5)]
    await api.send(bob, [alice], "not in alice's sent box")
    first = await api.call("GET", "/messages?box=sent", user=alice, expect=200)
    assert [m["id"] for m in first["messages"]] == ids[::-1] and first["next_before"] is None
    assert all(set(m) == SENT_VIEW and m["read_count"] == 0 and m["recipient_count"] == 2 for m in first["messages"])
    assert all(m["recipient_ids"] == sorted([bob.id, carol.id]) for m in first["messages"])

    await read(api, bob, ids[4])
    await read(api, carol, ids[4])
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    pages: list[list[dict[str, Any]]] = []
    before = None
    while True:
        params = {"box": "sent", "limit": "2"} | ({"before": str(before)} if before else {})
        page = await api.call("GET", "/messages", user=alice, params=params, expect=200)
        pages.append(page["messages"])
        before = page["next_before"]
        if before is None:
            break
    assert [[m["id"] for m in p] for p in pages] == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]
    assert [m["read_count"] for p in pages for m in p] == [2, 1, 1, 1, 1]  # right after the reads: never stale
    assert (await api.call("GET", "/messages/sent", user=alice, expect=200))["messages"] == [m for p in pages for m in p]
    # the inbox (cached first page) is the recipient's view and keeps its own read state
    inbox = (await api.call("GET", "/messages", user=carol, expect=200))["messages"]
    assert all(set(m) == RECEIVED_VIEW and m["recipient_count"] == 2 for m in inbox)
    assert [m["read_at"] is not None for m in inbox] == [True, False, False, False, False]
    refused = await api.call("GET", "/messages?box=sent&after_seq=1", user=alice, expect=422)
    assert "after_seq" in refused["error"]["details"]
    await api.call("GET", "/messages?box=outbox", user=alice, expect=422)


async def test_receipts_are_the_senders_alone_paged_and_filtered(api: Api) -> None:
    alice, *people = await api.users(6)
    stranger = await api.user()
    sent = await api.send(alice, people, "who has read this?")
    for user in people[1:4:2]:  # people[1] and people[3]
        await read(api, user, sent["id"])
    path = f"/messages/{sent['id']}/receipts"
    whole = await api.call("GET", path, user=alice, expect=200)
    assert set(whole) == {"message_id", "recipient_count", "read_count", "recipients", "next_after"}
    assert whole["message_id"] == sent["id"] and whole["recipient_count"] == 5 and whole["read_count"] == 2
    assert [r["user_id"] for r in whole["recipients"]] == sorted(u.id for u in people) and whole["next_after"] is None
    assert [r["read_at"] is not None for r in whole["recipients"]] == [False, True, False, True, False]

    pages, after = [], None
    while True:
        page = await api.call("GET", path, user=alice, params={"limit": "2"} | ({"after": str(after)} if after else {}), expect=200)
        pages.append([r["user_id"] for r in page["recipients"]])
        assert page["read_count"] == 2 and page["recipient_count"] == 5
        if (after := page["next_after"]) is None:
            break
    assert pages == [[people[0].id, people[1].id], [people[2].id, people[3].id], [people[4].id]]
    unread = await api.call("GET", path, user=alice, params={"unread": "true"}, expect=200)
    assert [r["user_id"] for r in unread["recipients"]] == [people[0].id, people[2].id, people[4].id]
    assert all(r["read_at"] is None for r in unread["recipients"])
    await api.call("GET", path, user=alice, params={"unread": "yes"}, expect=422)

    missing = await api.call("GET", f"/messages/{sent['id'] + 1000}/receipts", user=alice, expect=404)
    for other in (people[1], stranger):  # a recipient, and someone else: the 404 of a missing message
        assert await api.call("GET", path, user=other, expect=404) == missing


async def test_get_one_shows_the_sender_its_view_and_a_recipient_theirs(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    sent = await api.send(alice, [bob, carol])
    await read(api, bob, sent["id"])
    mine = await api.call("GET", f"/messages/{sent['id']}", user=alice, expect=200)
    assert set(mine) == SENT_VIEW and mine["read_count"] == 1 and mine["recipient_ids"] == sorted([bob.id, carol.id])
    theirs = await api.call("GET", f"/messages/{sent['id']}", user=carol, expect=200)
    assert set(theirs) == RECEIVED_VIEW and theirs["recipient_count"] == 2 and theirs["read_at"] is None


async def test_message_sent_reaches_every_device_of_the_sender_and_is_never_unread(api: Api) -> None:
    alice, bob = await api.users(2)
    phone, laptop, bobs = await Device.connect(api, alice), await Device.connect(api, alice), await Device.connect(api, bob)
    for device in (phone, laptop, bobs):
        await device.handshake()
    sent = await api.send(alice, [bob], "from the laptop's page")
    to_self = await api.send(alice, [alice, bob], "a note to self too")
    for device in (phone, laptop):  # the REST send has no device: the sending page gets it too, and dedupes by id
        frames = [await device.next() for _ in range(3)]
        assert [(f["type"], f["payload"].get("seq")) for f in frames] == \
            [("message.sent", None), ("message.new", 1), ("message.sent", None)]
        assert frames[0]["payload"] == sent and frames[2]["payload"] == to_self
        assert frames[1]["payload"]["id"] == to_self["id"] and "recipient_ids" not in frames[1]["payload"]
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # nothing more
    bob_frames = [await bobs.next() for _ in range(2)]
    assert [(f["type"], f["payload"]["seq"]) for f in bob_frames] == [("message.new", 1), ("message.new", 2)]
    assert await api.unread_count(alice) == 1  # only the copy she received
    # not replayed by `since`: only what she received comes back
    resumed = await Device.connect(api, alice, params={"token": alice.token, "since": "0"})
    replay = await resumed.resume()
    assert [m["id"] for m in replay["messages"]] == [to_self["id"]] and replay["synced"] == {"seq": 1, "count": 1}


async def test_every_read_becomes_a_receipt_frame_for_the_senders_devices(api: Api) -> None:
    """With no coalescing window (receipt_window 0): one frame per read, REST, WebSocket and mark-all alike."""
    alice, bob, carol, dave = await api.users(4)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    carols = await Device.connect(api, carol)
    await carols.handshake()
    sent = await api.send(alice, [bob, carol, dave], "3 recipients")
    assert (await sender.expect("message.sent"))["id"] == sent["id"]
    await carols.expect("message.new")

    await read(api, bob, sent["id"])
    await carols.ws.send_json({"type": "read", "payload": {"ids": [sent["id"]]}})
    await carols.expect("message.read")
    await api.call("POST", "/messages/read", user=dave, json={"all": True}, expect=200)
    await read(api, bob, sent["id"])  # again: nothing changed, no frame
    receipts = [await sender.expect("message.receipt") for _ in range(3)]
    assert [(r["message_id"], r["read_count"], r["recipient_count"]) for r in receipts] == [(sent["id"], n, 3) for n in (1, 2, 3)]
    assert [[reader["user_id"] for reader in r["readers"]] for r in receipts] == [[bob.id], [carol.id], [dave.id]]
    await sender.ws.send_json({"type": "ping"})
    assert (await sender.next())["type"] == "pong"
    assert [f["type"] for f in sender.frames] == ["connected", "message.unread", "message.synced", "message.sent",
                                                 *["message.receipt"] * 3, "pong"]
    receipts_now = await api.call("GET", f"/messages/{sent['id']}/receipts", user=alice, expect=200)
    assert {r["user_id"]: r["read_at"] for r in receipts_now["recipients"]} == \
        {r["readers"][0]["user_id"]: r["readers"][0]["read_at"] for r in receipts}
    # live only: a device resuming with `since` gets neither message.sent nor message.receipt again
    resumed = await Device.connect(api, alice, params={"token": alice.token, "since": "0"})
    assert await resumed.resume() == {"messages": [], "synced": {"seq": 0, "count": 0}}


async def test_reads_within_the_window_share_one_frame(make_client: Any, db_url: str) -> None:
    """A window far longer than the test, ended by hand (what push.receipt_pending_max does
    when it fills): whatever the machine's load, every read below falls inside it."""
    api = Api(await make_client(base_config(database={"url": db_url}, push={"receipt_window": 60.0})))
    coalescer = api.client.app[push_hub_key].receipts
    alice, bob, carol, dave = await api.users(4)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    first = await api.send(alice, [bob, carol, dave], "first")
    second = await api.send(alice, [bob], "second")
    await read(api, bob, first["id"])
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)  # first again (no-op) and second
    await read(api, carol, first["id"])
    await sender.ws.send_json({"type": "ping"})
    frames = [await sender.next() for _ in range(3)]
    assert [f["type"] for f in frames] == ["message.sent", "message.sent", "pong"]  # the window is still open
    coalescer.flush_soon()
    frames = [await sender.next(timeout=10) for _ in range(2)]
    assert [(f["type"], f["payload"]["message_id"]) for f in frames] == [("message.receipt", first["id"]), ("message.receipt", second["id"])]
    one, two = frames[0]["payload"], frames[1]["payload"]
    assert [r["user_id"] for r in one["readers"]] == [bob.id, carol.id] and one["read_count"] == 2 and one["recipient_count"] == 3
    assert [r["user_id"] for r in two["readers"]] == [bob.id] and two["read_count"] == 1 and two["recipient_count"] == 1
    await read(api, dave, first["id"])  # a later read: its own window, its own frame
    await sender.ws.send_json({"type": "ping"})
    assert (await sender.next())["type"] == "pong"
    coalescer.flush_soon()
    late = await sender.expect("message.receipt", timeout=10)
    assert [r["user_id"] for r in late["readers"]] == [dave.id] and late["read_count"] == 3
    assert coalescer.frames == 3


def counted(message_id: int, read_count: int, sender_id: int = 1, recipient_count: int = 3) -> dict[str, Any]:
    return {"id": message_id, "sender_id": sender_id, "read_count": read_count, "recipient_count": recipient_count}


async def test_a_read_during_a_flush_gets_a_window_of_its_own() -> None:
    async def no_counts(ids: list[int]) -> dict[int, int]:
        return {}

    held = Held(no_counts)
    out: asyncio.Queue[tuple[int, int, str]] = asyncio.Queue()

    async def publish(items: Any, committed_at: float) -> None:
        for item in items:
            out.put_nowait(item)

    coalescer = ReceiptCoalescer(0.01, held, publish)
    now = dt.datetime.now(dt.timezone.utc)
    await coalescer.on_receipts(2, now, [counted(7, 1)])
    await asyncio.wait_for(held.started.wait(), 5)  # the first flush awaits its counts
    await coalescer.on_receipts(3, now, [counted(7, 2)])  # lands in the next window
    held.release.set()
    frames = [await asyncio.wait_for(out.get(), 5) for _ in range(2)]
    payloads = [json_payload(frame) for _, _, frame in frames]
    assert [(p["read_count"], [r["user_id"] for r in p["readers"]]) for p in payloads] == [(1, [2]), (2, [3])]
    assert coalescer.frames == 2 and out.empty()
    await coalescer.close()


async def test_a_read_while_a_flush_is_under_way_reaches_the_sender(make_client: Any, db_url: str) -> None:
    api = Api(await make_client(base_config(database={"url": db_url}, push={"receipt_window": 0.05})))
    alice, bob, carol = await api.users(3)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    sent = await api.send(alice, [bob, carol])
    await sender.expect("message.sent")
    coalescer = api.client.app[push_hub_key].receipts
    held = coalescer._counts = Held(coalescer._counts)
    await read(api, bob, sent["id"])
    await asyncio.wait_for(held.started.wait(), 10)  # bob's window closed; its flush is reading the counts
    await read(api, carol, sent["id"])
    held.release.set()
    frames = [await sender.expect("message.receipt", timeout=10) for _ in range(2)]
    assert [(f["read_count"], [r["user_id"] for r in f["readers"]]) for f in frames] == [(2, [bob.id]), (2, [carol.id])]


async def test_a_full_window_ends_at_once(make_client: Any, db_url: str) -> None:
    """push.receipt_pending_max messages waiting: their frames go out without waiting a minute."""
    api = Api(await make_client(base_config(database={"url": db_url}, push={"receipt_window": 60.0, "receipt_pending_max": 2})))
    alice, bob = await api.users(2)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    first, second = await api.send(alice, [bob], "one"), await api.send(alice, [bob], "two")
    await read(api, bob, first["id"])
    await sender.ws.send_json({"type": "ping"})
    frames = [await sender.next() for _ in range(3)]
    assert [f["type"] for f in frames] == ["message.sent", "message.sent", "pong"]  # one waiting: no receipt yet
    await read(api, bob, second["id"])  # two waiting: the window is full
    frames = [await sender.expect("message.receipt", timeout=10) for _ in range(2)]
    assert [(f["message_id"], f["read_count"], [r["user_id"] for r in f["readers"]]) for f in frames] == \
        [(first["id"], 1, [bob.id]), (second["id"], 1, [bob.id])]


async def test_read_counts_of_more_messages_than_one_statement_takes(api: Api) -> None:
    alice, bob = await api.users(2)
    sent = [(await api.send(alice, [bob], f"m{i}"))["id"] for i in range(3)]
    await read(api, bob, sent[2])
    service = api.client.app[message_service_key]
    asked = sent + list(range(sent[-1] + 1, sent[-1] + 1200))  # more than a chunk, mostly missing
    assert await service.read_counts(asked) == {sent[0]: 0, sent[1]: 0, sent[2]: 1}


def commit_a_read_now(db_url: str, message_id: int, reader_id: int) -> None:
    """What a concurrent mark commits (the row and the counter), from a connection of its own."""
    statements = [f"UPDATE message_recipients SET read_at = '2026-11-29 08:00:00' WHERE message_id = {message_id} "
                  f"AND recipient_id = {reader_id}", f"UPDATE messages SET read_count = read_count + 1 WHERE id = {message_id}"]
    if db_url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(make_url(db_url).database, timeout=5)) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.commit()
    else:
        url = make_url(db_url)
        conn = _mysql_connect(url, url.database)
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        conn.close()


async def test_receipts_count_and_page_come_from_one_snapshot(make_client: Any, db_url: str) -> None:
    """A read that commits between the query of the counts and that of the page must show in
    both or in neither: here it commits right before the page is read."""
    api = Api(await make_client(base_config(database={"url": db_url})))
    alice, bob, carol = await api.users(3)
    sent = await api.send(alice, [bob, carol])
    armed = True

    @event.listens_for(api.client.app[engine_key].sync_engine, "before_cursor_execute")
    def between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal armed
        if armed and "ORDER BY message_recipients.recipient_id" in statement:
            armed = False
            commit_a_read_now(db_url, sent["id"], carol.id)

    receipts = await api.call("GET", f"/messages/{sent['id']}/receipts", user=alice, expect=200)
    assert not armed
    read_in_page = [r["user_id"] for r in receipts["recipients"] if r["read_at"] is not None]
    assert receipts["read_count"] == len(read_in_page) == 0
    again = await api.call("GET", f"/messages/{sent['id']}/receipts", user=alice, expect=200)
    assert again["read_count"] == 1 and [r["user_id"] for r in again["recipients"] if r["read_at"]] == [carol.id]


@pytest.mark.parametrize("window", [0.0, 60.0])
async def test_nothing_is_built_for_a_sender_with_no_device(make_client: Any, db_url: str, window: float) -> None:
    """Without Redis the process knows the sender has no device: no message.sent, no receipt
    and no re-read of the counts for them; once a device connects it gets both again."""
    api = Api(await make_client(base_config(database={"url": db_url}, push={"receipt_window": window})))
    hub = api.client.app[push_hub_key]
    coalescer = hub.receipts
    held = coalescer._counts = Held(coalescer._counts)
    held.release.set()
    alice, bob, carol = await api.users(3)
    bobs = await Device.connect(api, bob)
    await bobs.handshake()
    before = hub.broker.publishes
    sent = await api.send(alice, [bob, carol])  # alice has no device
    assert (await bobs.expect("message.new"))["id"] == sent["id"]
    assert hub.broker.publishes == before + 2  # the recipients' message.new, no message.sent
    await read(api, bob, sent["id"])
    await bobs.expect("message.read")
    coalescer.flush_soon()
    await until(lambda: not coalescer._pending and (coalescer._flushing is None or coalescer._flushing.done()))
    assert (coalescer.frames, held.started.is_set(), hub.broker.publishes) == (0, False, before + 3)  # + bob's message.read

    alices = await Device.connect(api, alice)
    await alices.handshake()
    again = await api.send(alice, [carol])
    await read(api, carol, sent["id"])
    coalescer.flush_soon()
    frames = [await alices.next(timeout=10) for _ in range(2)]
    assert [(f["type"], f["payload"].get("id", f["payload"].get("message_id"))) for f in frames] == \
        [("message.sent", again["id"]), ("message.receipt", sent["id"])]
    assert frames[1]["payload"]["read_count"] == 2 and [r["user_id"] for r in frames[1]["payload"]["readers"]] == [carol.id]


async def test_concurrent_reads_count_each_reader_once(make_client: Any, db_url: str) -> None:
    """Every recipient marks the notice read three ways at once (one message, the list, all):
    the counter ends at exactly the number of readers, as the rows say."""
    api = Api(await make_client(base_config(database={"url": db_url}, push={"receipt_window": 0.0})))
    alice, *people = await api.users(13)
    notice = await api.send(alice, people, "everyone: read me")
    other = await api.send(alice, people[:6], "and me")

    async def read_three_ways(user: User) -> None:
        one, *_ = await asyncio.gather(
            api.call("POST", f"/messages/{notice['id']}/read", user=user, expect=200),
            api.call("POST", "/messages/read", user=user, json={"ids": [notice["id"], other["id"]]}, expect=200),
            api.call("POST", "/messages/read", user=user, json={"all": True}, expect=200))
        assert one["read_at"] is not None  # also when another of the three marked the row first

    await asyncio.gather(*(read_three_ways(user) for user in people))
    box = {m["id"]: m for m in (await api.call("GET", "/messages?box=sent", user=alice, expect=200))["messages"]}
    assert (box[notice["id"]]["read_count"], box[other["id"]]["read_count"]) == (12, 6)
    async with api.client.app[engine_key].connect() as conn:
        counted = dict((await conn.execute(sa.select(messages.c.id, messages.c.read_count))).all())
        rows = dict((await conn.execute(sa.select(message_recipients.c.message_id, sa.func.count())
                                        .where(message_recipients.c.read_at.is_not(None))
                                        .group_by(message_recipients.c.message_id))).all())
    assert counted == rows == {notice["id"]: 12, other["id"]: 6}


# Two instances sharing MariaDB and Redis: the sender's devices on one, the readers on the other.

@pytest.fixture
def shared(mariadb_url: str, redis_url: str) -> Config:
    _clean_mariadb(mariadb_url)
    return base_config(database={"url": mariadb_url}, redis={"url": redis_url, "prefix": f"t{uuid.uuid4().hex[:10]}"},
                       push={"receipt_window": 0.0})


async def test_message_sent_and_receipts_cross_instances(make_client: Any, shared: Config) -> None:
    a, b = Api(await make_client(shared)), Api(await make_client(shared))
    alice, bob, carol = await a.users(3)
    on_a, on_b = await Device.connect(a, alice), await Device.connect(b, alice)
    carols = await Device.connect(b, carol)
    for device in (on_a, on_b, carols):
        await device.handshake()
    sent = await a.send(alice, [bob, carol], "sent through a")
    for device in (on_a, on_b):  # (a receipt published on b could overtake a's message.sent on b: read after)
        assert await device.expect("message.sent", timeout=10) == sent
    await read(b, bob, sent["id"])  # REST on b
    await carols.expect("message.new")
    await carols.ws.send_json({"type": "read", "payload": {"ids": [sent["id"]]}})  # WebSocket on b
    for device in (on_a, on_b):
        frames = [await device.next(timeout=10) for _ in range(2)]
        assert [f["type"] for f in frames] == ["message.receipt", "message.receipt"]
        assert [(f["payload"]["read_count"], f["payload"]["readers"][0]["user_id"]) for f in frames] == \
            [(1, bob.id), (2, carol.id)]
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # once each: no echo from the other instance
    assert (await a.call("GET", f"/messages/{sent['id']}/receipts", user=alice, expect=200))["read_count"] == 2


@pytest.fixture(params=["sqlite", "mariadb"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A database with no schema at all, to migrate step by step."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    server = make_url(request.getfixturevalue("mariadb_url"))
    name = f"meeting_test_{uuid.uuid4().hex[:12]}"
    conn = _mysql_connect(server)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


async def test_the_migration_counts_existing_messages(empty_db_url: str) -> None:
    engine = create_engine(base_config(database={"url": empty_db_url}).database)
    try:
        await migrate(engine, "0004")
        now = "2026-11-28 09:00:00"
        async with engine.begin() as conn:
            for user_id in (1, 2, 3, 4):
                await conn.execute(sa.text("INSERT INTO users (id, username, display_name, password_hash, created_at) "
                                           f"VALUES ({user_id}, 'u{user_id}', 'u', 'x', '{now}')"))
            for message_id in (1, 2):
                await conn.execute(sa.text("INSERT INTO messages (id, sender_id, type, content, created_at) "
                                           f"VALUES ({message_id}, 1, 'text', 'old', '{now}')"))
            reads = [(1, 2, now), (1, 3, None), (1, 4, now), (2, 3, None)]
            for seq, (message_id, recipient_id, read_at) in enumerate(reads, 1):
                await conn.execute(sa.text("INSERT INTO message_recipients (message_id, recipient_id, read_at, seq) "
                                           "VALUES (:m, :r, :at, :s)"), {"m": message_id, "r": recipient_id, "at": read_at, "s": seq})
        await migrate(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(messages.c.id, messages.c.recipient_count, messages.c.read_count)
                                       .order_by(messages.c.id))).all()
        assert [tuple(r) for r in rows] == [(1, 3, 2), (2, 1, 0)]
    finally:
        await engine.dispose()


async def test_receipts_waiting_for_their_window_go_out_before_shutdown(aiohttp_client: Any, db_url: str) -> None:
    server = TestServer(create_app(base_config(database={"url": db_url}, push={"receipt_window": 60.0})))
    api = Api(await aiohttp_client(server))
    alice, bob = await api.users(2)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    sent = await api.send(alice, [bob])
    await sender.expect("message.sent")
    await read(api, bob, sent["id"])  # its frame would wait a minute
    await server.close()
    receipt = await sender.expect("message.receipt")
    assert (receipt["message_id"], receipt["read_count"], [r["user_id"] for r in receipt["readers"]]) == (sent["id"], 1, [bob.id])
    assert await sender.closed() == 1001


async def test_each_instance_coalesces_its_own_reads_across_instances(make_client: Any, shared: Config) -> None:
    """A window > 0 with two instances: the reads served by one instance within a window are
    one frame on every device of the sender, wherever it is; reads served by both are one
    frame per instance (the highest read_count is the truth). Windows are ended by hand."""
    windowed = with_overrides(shared, push={"receipt_window": 60.0})
    a, b = Api(await make_client(windowed)), Api(await make_client(windowed))
    on_a_coalescer, on_b_coalescer = a.client.app[push_hub_key].receipts, b.client.app[push_hub_key].receipts
    alice, bob, carol, dave, erin = await a.users(5)
    on_a, on_b = await Device.connect(a, alice), await Device.connect(b, alice)
    carols = await Device.connect(b, carol)
    for device in (on_a, on_b, carols):
        await device.handshake()
    sent = await a.send(alice, [bob, carol, dave, erin], "sent through a")
    for device in (on_a, on_b):
        assert await device.expect("message.sent", timeout=10) == sent
    await carols.expect("message.new")
    await read(b, bob, sent["id"])  # REST on b
    await carols.ws.send_json({"type": "read", "payload": {"ids": [sent["id"]]}})  # WebSocket on b
    await carols.expect("message.read")
    on_b_coalescer.flush_soon()
    for device in (on_a, on_b):
        receipt = await device.expect("message.receipt", timeout=10)
        assert (receipt["read_count"], [r["user_id"] for r in receipt["readers"]]) == (2, [bob.id, carol.id])

    await read(a, dave, sent["id"])  # one read on each instance, in one window
    await read(b, erin, sent["id"])
    on_a_coalescer.flush_soon()
    for device in (on_a, on_b):
        receipt = await device.expect("message.receipt", timeout=10)
        assert (receipt["read_count"], [r["user_id"] for r in receipt["readers"]]) == (4, [dave.id])
    on_b_coalescer.flush_soon()
    for device in (on_a, on_b):
        receipt = await device.expect("message.receipt", timeout=10)
        assert (receipt["read_count"], [r["user_id"] for r in receipt["readers"]]) == (4, [erin.id])
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # once each: no echo from the other instance
    assert (on_a_coalescer.frames, on_b_coalescer.frames) == (1, 2)


async def test_a_flood_of_receipts_drops_what_does_not_fit_and_never_closes_the_sender(
        tight_client: Any, db_url: str) -> None:
    """One mark-all of 1,200 messages of one sender: 1,200 message.receipt frames in one flush
    (the in-process broker delivers them in one go) to a sender that reads nothing meanwhile,
    behind small socket buffers. They are live only: those written before the transport filled
    up and those that fit the sender's queue arrive, in order; the rest are dropped and counted,
    the socket stays open, and a message for the sender afterwards still arrives in order. (A
    sender that reads keeps up: Connection.push writes straight to an idle socket.)"""
    api = await tight_client(base_config(database={"url": db_url}, push={"receipt_window": 0.0, "queue_limit": 100}))
    stats = api.client.app[stats_key]
    alice, bob = await api.users(2)
    ids: list[int] = []
    for start in range(0, 1200, 100):  # concurrent sends, grouped into a few transactions by the writer
        sent = await asyncio.gather(*(api.send(alice, [bob], f"notice {i}") for i in range(start, start + 100)))
        ids.extend(m["id"] for m in sent)
    ids.sort()
    session, sender = await stalled_device(api, alice, {})
    await sender.handshake()
    marked = await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    assert marked == {"updated": 1200, "count": 0}
    await until(lambda: stats.live_frames_dropped > 0)  # the flush came, and the sender's queue filled up
    await sender.ws.send_json({"type": "ping"})
    receipts: list[dict[str, Any]] = []
    while (frame := await sender.next(timeout=10))["type"] == "message.receipt":
        receipts.append(frame["payload"])
    assert frame["type"] == "pong"
    got = [r["message_id"] for r in receipts]
    assert len(got) >= 75  # three quarters of the queue were the droppable frames' to take
    assert got == ids[:len(got)] and all(r["read_count"] == 1 for r in receipts)
    assert stats.live_frames_dropped == 1200 - len(got)
    assert stats.slow_consumer_closes == 0
    after = await api.send(bob, [alice], "still there?")
    assert (await sender.expect("message.new"))["id"] == after["id"]
    await sender.ws.send_json({"type": "ping"})
    assert (await sender.next())["type"] == "pong"
    assert [f["type"] for f in sender.frames] == ["connected", "message.unread", "message.synced",
                                                 *["message.receipt"] * len(got), "pong", "message.new", "pong"]
    assert (await api.call("GET", f"/messages/{ids[-1]}/receipts", user=alice, expect=200))["read_count"] == 1
    await session.close()


async def test_a_receipt_names_the_latest_readers_up_to_the_limit_and_counts_them_all(make_client: Any, db_url: str) -> None:
    """push.receipt_readers_max 3, five readers in one window: one frame naming the last three,
    with read_count 5; the receipts endpoint lists all five."""
    api = Api(await make_client(base_config(database={"url": db_url},
                                            push={"receipt_window": 60.0, "receipt_readers_max": 3})))
    coalescer = api.client.app[push_hub_key].receipts
    alice, *people = await api.users(6)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    sent = await api.send(alice, people, "a notice")
    await sender.expect("message.sent")
    for user in people:
        await read(api, user, sent["id"])
    coalescer.flush_soon()
    receipt = await sender.expect("message.receipt", timeout=10)
    assert (receipt["read_count"], receipt["recipient_count"]) == (5, 5)
    assert [r["user_id"] for r in receipt["readers"]] == [u.id for u in people[2:]]
    await sender.ws.send_json({"type": "ping"})
    assert (await sender.next())["type"] == "pong"  # one frame
    listed = await api.call("GET", f"/messages/{sent['id']}/receipts", user=alice, expect=200)
    assert [r["user_id"] for r in listed["recipients"] if r["read_at"]] == sorted(u.id for u in people)


async def test_the_pending_bound_holds_while_a_flush_is_under_way(make_client: Any, db_url: str) -> None:
    """push.receipt_pending_max 2: the first window fills and its flush hangs on its counts; the
    next window fills too; a read of a fifth message then waits (after its commit) instead of
    growing the window, and goes on once the flush is done. Every frame arrives, in order."""
    api = Api(await make_client(base_config(database={"url": db_url},
                                            push={"receipt_window": 60.0, "receipt_pending_max": 2})))
    coalescer = api.client.app[push_hub_key].receipts
    held = coalescer._counts = Held(coalescer._counts)
    alice, bob = await api.users(2)
    sender = await Device.connect(api, alice)
    await sender.handshake()
    sent = [await api.send(alice, [bob], f"m{i}") for i in range(5)]
    for message in sent:
        assert (await sender.expect("message.sent"))["id"] == message["id"]
    await read(api, bob, sent[0]["id"])
    await read(api, bob, sent[1]["id"])  # the window is full: its flush starts and waits for its counts
    await asyncio.wait_for(held.started.wait(), 10)
    await read(api, bob, sent[2]["id"])
    await read(api, bob, sent[3]["id"])  # the next window is full as well
    fifth = asyncio.ensure_future(read(api, bob, sent[4]["id"]))
    try:
        await until(lambda: getattr(coalescer, "waiting", False) or fifth.done())
        assert not fifth.done() and len(coalescer._pending) == 2  # it waits: the bound holds
    finally:
        held.release.set()  # (also on failure: a flush hanging on its counts would hang the shutdown)
    await asyncio.wait_for(fifth, 10)
    frames = [await sender.expect("message.receipt", timeout=10) for _ in range(4)]
    coalescer.flush_soon()  # the fifth read opened a window of its own
    frames.append(await sender.expect("message.receipt", timeout=10))
    assert [(f["message_id"], f["read_count"], [r["user_id"] for r in f["readers"]]) for f in frames] == \
        [(m["id"], 1, [bob.id]) for m in sent]
    await sender.ws.send_json({"type": "ping"})
    assert (await sender.next())["type"] == "pong"
