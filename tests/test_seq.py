"""Per-recipient sequence numbers: gap-free, in commit order, deadlock-free, migrated."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from meeting.config import build_config
from meeting.db import create_engine, migrate
from tests.conftest import _mysql_connect
from tests.helpers import Api


async def _seqs(api: Api, user: Any) -> list[int]:
    seqs: list[int] = []
    after = 0
    while True:
        page = await api.call("GET", "/messages", user=user, params={"after_seq": str(after), "limit": "100"}, expect=200)
        seqs += [m["seq"] for m in page["messages"]]
        if page["next_after_seq"] is None:
            return seqs
        after = page["next_after_seq"]


async def test_concurrent_and_crossing_sends_number_each_inbox_without_holes(api: Api) -> None:
    users = await api.users(4)
    sends = [api.send(s, [r for r in users if r is not s] if i % 2 else [users[(j + 1) % 4]], f"{i}")
             for i in range(6) for j, s in enumerate(users)]
    await asyncio.gather(*sends)  # A->B while B->A: the lock order must not deadlock
    for user in users:
        seqs = await _seqs(api, user)
        assert seqs == list(range(1, len(seqs) + 1)) and seqs


async def test_failed_sends_leave_no_hole_and_after_seq_pages(api: Api) -> None:
    alice, bob = await api.users(2)
    first = await api.send(alice, [bob], "one")
    await api.call("POST", "/messages", user=alice, json={"recipient_ids": [bob.id, 999999], "content": "x"}, expect=422)
    for i in range(4):
        await api.send(alice, [bob], f"m{i}")
    page = await api.call("GET", "/messages", user=bob, params={"after_seq": "0", "limit": "2"}, expect=200)
    assert [m["seq"] for m in page["messages"]] == [1, 2] and page["next_after_seq"] == 2
    assert page["messages"][0]["id"] == first["id"]
    rest = await api.call("GET", "/messages", user=bob, params={"after_seq": "2", "limit": "10"}, expect=200)
    assert [m["seq"] for m in rest["messages"]] == [3, 4, 5] and rest["next_after_seq"] is None
    assert (await api.call("GET", "/messages/unread", user=bob))["messages"][0]["seq"] == 1
    await api.call("GET", "/messages", user=bob, params={"after_seq": "1", "before": "5"}, expect=422)
    await api.call("GET", "/messages", user=bob, params={"after_seq": "-1"}, expect=422)


@pytest.fixture(params=["sqlite", "mariadb"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'mig.db'}"
        return
    server = make_url(request.getfixturevalue("mariadb_url"))
    name = f"meeting_mig_{uuid.uuid4().hex[:10]}"
    conn = _mysql_connect(server.set(database=None))
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    yield server.set(database=name).render_as_string(hide_password=False)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE `{name}`")
    conn.close()


async def test_migration_0002_numbers_existing_rows_in_message_order(empty_db_url: str) -> None:
    engine = create_engine(build_config({"database": {"url": empty_db_url}}, environ={}).database)
    try:
        await migrate(engine, "0001")
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        async with engine.begin() as conn:
            for i in (1, 2, 3):
                await conn.execute(sa.text("INSERT INTO users (id, username, display_name, password_hash, created_at) "
                                           "VALUES (:i, :n, 'x', 'x', :t)"), {"i": i, "n": f"u{i}", "t": now})
            for m in (10, 11, 12):
                await conn.execute(sa.text("INSERT INTO messages (id, sender_id, type, content, created_at) "
                                           "VALUES (:m, 1, 'text', 'c', :t)"), {"m": m, "t": now})
            await conn.execute(sa.text("INSERT INTO message_recipients (message_id, recipient_id) VALUES (12, 2), (10, 2), (11, 3), (11, 2)"))
        await migrate(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT recipient_id, message_id, seq FROM message_recipients ORDER BY recipient_id, seq"))).all()
            counters = (await conn.execute(sa.text("SELECT id, last_seq FROM users ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [(2, 10, 1), (2, 11, 2), (2, 12, 3), (3, 11, 1)]
        assert [tuple(r) for r in counters] == [(1, 0), (2, 3), (3, 1)]
    finally:
        await engine.dispose()


async def test_unread_pages_by_seq_with_the_after_seq_cursor(api: Api) -> None:
    alice, bob = await api.users(2)
    ids = [(await api.send(alice, [bob], f"u{i}"))["id"] for i in range(7)]  # seqs 1..7
    await api.call("POST", "/messages/read", user=bob, json={"ids": [ids[1], ids[4]]}, expect=200)  # seqs 2 and 5

    async def page(after: int | None) -> dict[str, Any]:
        params = {"limit": "2", **({} if after is None else {"after_seq": str(after)})}
        return await api.call("GET", "/messages/unread", user=bob, params=params, expect=200)

    first = await page(None)
    assert [m["seq"] for m in first["messages"]] == [1, 3] and first["next_after_seq"] == 3 and first["count"] == 5
    await api.call("POST", f"/messages/{ids[3]}/read", user=bob, expect=200)  # seq 4, read between pages
    second = await page(first["next_after_seq"])
    assert [m["seq"] for m in second["messages"]] == [6, 7] and second["next_after_seq"] is None and second["count"] == 4
    assert (await page(7))["messages"] == [] and (await page(0))["next_after_seq"] == 3
    for bad in ("-1", "x", "99999999999999999999"):
        body = await api.call("GET", "/messages/unread", user=bob, params={"after_seq": bad}, expect=422)
        assert "after_seq" in body["error"]["details"]
