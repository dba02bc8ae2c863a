"""meeting.storage.packets: the group commit's transaction on MariaDB as two packets.

Through the real MariaDB: whatever statement of a packet fails, nothing of the
transaction is applied and the failure is what the statement alone raised (KeyTaken,
a lock conflict, an integrity error); a batch naming an unknown user is rolled back
and answered per draft by the unpacked path; content is stored as sent, whatever it
holds."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from meeting.db import create_engine, idempotency_keys, message_recipients, messages, transaction, users, utcnow
from meeting.errors import Unavailable
from meeting.idempotency import Keys, Once, Response
from meeting.messages import store_drafts
from meeting.storage import driver, packets
from meeting.storage.idempotency import KeyTaken
from meeting.storage.messages import Draft, UnknownUsers
from meeting.writer import WriterConnection
from tests.conftest import _clean_mariadb, base_config
from tests.helpers import Api


@pytest.fixture
async def engines(mariadb_url: str) -> AsyncIterator[tuple[Any, Any]]:
    """The app's engine for checks, and the one the writer packs on (two pools: a check
    never waits behind the writer's kept connection)."""
    _clean_mariadb(mariadb_url)
    cfg = base_config(database={"url": mariadb_url, "lock_wait_timeout": 1}).database
    main, writer = create_engine(cfg), create_engine(cfg)
    yield main, writer
    await writer.dispose()
    await main.dispose()


async def _users(engine: Any, count: int) -> list[int]:
    async with engine.begin() as conn:
        await conn.execute(users.insert(), [{"username": f"p{i}", "display_name": "p", "password_hash": "x", "created_at": utcnow()}
                                            for i in range(count)])
        return list((await conn.execute(sa.select(users.c.id).order_by(users.c.id))).scalars())


async def _state(engine: Any) -> tuple[dict[int, int], int, int, int]:
    """Every user's last_seq and the rows of messages, message_recipients, idempotency_keys."""
    async with engine.connect() as conn:
        seqs = dict((await conn.execute(sa.select(users.c.id, users.c.last_seq))).all())
        counts = [(await conn.execute(sa.select(sa.func.count()).select_from(t))).scalar_one()
                  for t in (messages, message_recipients, idempotency_keys)]
    return seqs, *counts  # type: ignore[return-value]


def _once(key: str) -> Once:
    return Once(key, "f" * 64, lambda m: Response(201, json.dumps({"id": m["id"]})))


async def _packed(writer: WriterConnection, drafts: list[Draft], onces: list[Once | None] | None = None,
                  attempts: int = 4) -> list[Any]:
    return await writer.transaction(
        lambda p: store_drafts(p.conn, drafts, Keys(ttl=60), onces or [None] * len(drafts), look=False, packets=p),
        attempts, packed=True)


async def test_a_packed_batch_stores_what_the_unpacked_path_would(engines: tuple[Any, Any]) -> None:
    main, engine = engines
    a, b, c = await _users(main, 3)
    writer = WriterConnection(engine)
    tricky = "'; DROP TABLE users; -- \\' \" %s %(x)s \\\\ \u00e9\U0001f600 COMMIT; ROLLBACK"
    results = await _packed(writer, [Draft(a, (b, c), tricky, "text"), Draft(b, (c,), "two", "text"), Draft(a, (c,), "3", "text")],
                            [_once("k1"), None, _once("k2")])
    assert [r.status for r in (results[0], results[2])] == [201, 201] and results[1]["seqs"] == {c: 2}
    assert results[0].fresh["seqs"] == {b: 1, c: 1} and results[2].fresh["seqs"] == {c: 3}
    async with main.connect() as conn:
        assert (await conn.execute(sa.select(messages.c.content).order_by(messages.c.id))).scalars().all() == [tricky, "two", "3"]
        assert sorted((await conn.execute(sa.select(message_recipients.c.recipient_id, message_recipients.c.seq))).all()) == [
            (b, 1), (c, 1), (c, 2), (c, 3)]
    assert await _state(main) == ({a: 0, b: 1, c: 3}, 3, 4, 2)
    await writer.close()


async def test_an_unknown_user_rolls_the_packed_batch_back_whole(engines: tuple[Any, Any]) -> None:
    main, engine = engines
    a, b = await _users(main, 2)
    writer = WriterConnection(engine)
    for drafts in ([Draft(a, (b,), "ok", "text"), Draft(a, (b, 424242), "no", "text")],  # an unknown recipient
                   [Draft(a, (b,), "ok", "text"), Draft(424242, (b,), "no", "text")]):  # an unknown sender: the insert fails too
        with pytest.raises(UnknownUsers):
            await _packed(writer, drafts, [_once("k"), None])
        assert await _state(main) == ({a: 0, b: 0}, 0, 0, 0)
    await writer.close()


async def test_a_taken_key_in_the_commit_packet_applies_nothing(engines: tuple[Any, Any]) -> None:
    main, engine = engines
    a, b = await _users(main, 2)
    async with main.begin() as conn:
        await conn.execute(idempotency_keys.insert().values(user_id=a, idempotency_key="k", fingerprint="f" * 64, status=201,
                                                            response="{}", created_at=utcnow()))
    writer = WriterConnection(engine)
    with pytest.raises(KeyTaken):
        await _packed(writer, [Draft(a, (b,), "first", "text"), Draft(a, (b,), "second", "text")], [None, _once("k")])
    assert await _state(main) == ({a: 0, b: 0}, 0, 0, 1)
    [stored] = await _packed(writer, [Draft(a, (b,), "after", "text")])  # the next batch runs as if nothing happened
    assert stored["seqs"] == {b: 1}
    await writer.close()


async def test_a_failed_recipients_insert_in_the_commit_packet_applies_nothing(engines: tuple[Any, Any]) -> None:
    """The recipients row breaks the (recipient_id, seq) unique index: its statement fails,
    the COMMIT after it in the same packet never runs, the bump and the message go too."""
    main, engine = engines
    a, b = await _users(main, 2)
    writer = WriterConnection(engine)
    await _packed(writer, [Draft(a, (b,), "first", "text")])
    async with main.begin() as conn:
        await conn.execute(users.update().where(users.c.id == b).values(last_seq=0))  # seq 1 is taken: the next insert collides
    with pytest.raises(IntegrityError) as caught:
        await _packed(writer, [Draft(a, (b,), "second", "text")], [_once("k")])
    assert caught.value.orig.args[0] == 1062
    assert await _state(main) == ({a: 0, b: 0}, 1, 1, 0)
    await writer.close()


async def test_a_lock_conflict_in_the_first_packet_is_retried_then_busy(engines: tuple[Any, Any], caplog: Any) -> None:
    main, engine = engines
    a, b = await _users(main, 2)
    writer = WriterConnection(engine)
    caplog.set_level(logging.INFO, "meeting.db")
    async with main.connect() as holder:
        await holder.begin()
        await driver.execute(holder, *driver.lock_statement([b]))  # b's row is held: the packet's lock waits, then times out
        with pytest.raises(Unavailable) as caught:
            await _packed(writer, [Draft(a, (b,), "waits", "text")], attempts=2)
        assert caught.value.code == "database_busy" and caplog.text.count("lost a lock conflict (1205)") == 2
        await holder.rollback()
    assert await _state(main) == ({a: 0, b: 0}, 0, 0, 0)
    [stored] = await _packed(writer, [Draft(a, (b,), "after", "text")])
    assert stored["seqs"] == {b: 1}
    await writer.close()


async def test_a_packed_transaction_refuses_a_statement_through_sqlalchemy(engines: tuple[Any, Any]) -> None:
    """It would commit with the packet while SQLAlchemy believed its transaction open."""
    main, engine = engines
    a, b = await _users(main, 2)

    async def mixed(p: packets.Packets) -> None:
        await p.conn.execute(users.update().where(users.c.id == a).values(last_seq=5))

    async with engine.connect() as conn:
        with pytest.raises(RuntimeError):
            await transaction(engine, mixed, 1, run=packets.run, connect=lambda: _Borrowed(conn))
    assert await _state(main) == ({a: 0, b: 0}, 0, 0, 0)


class _Borrowed:
    def __init__(self, conn: Any):
        self.conn = conn

    async def __aenter__(self) -> Any:
        return self.conn

    async def __aexit__(self, *exc: Any) -> None:
        if self.conn.in_transaction():
            await self.conn.rollback()


async def test_a_batch_with_an_unknown_recipient_answers_each_send(api: Api, db_url: str, caplog: Any) -> None:
    """Over HTTP, on both backends: sends that share a batch with one naming an unknown user
    are stored, with seqs without holes; that one is answered 422 (on MariaDB, after the
    packed attempt was rolled back)."""
    alice, bob = await api.users(2)
    caplog.set_level(logging.INFO, "meeting.messages")
    bodies = [{"recipient_ids": [bob.id] if i != 2 else [bob.id, 424242], "content": f"m{i}"} for i in range(5)]
    answers = await asyncio.gather(*(api.client.post("/messages", json=b, headers=alice.headers) for b in bodies))
    assert [r.status for r in answers] == [201, 201, 422, 201, 201]
    assert (await answers[2].json())["error"]["details"]["unknown_ids"] == [424242]
    body = await api.call("GET", "/messages", params={"after_seq": 0}, user=bob, expect=200)
    assert [(m["content"], m["seq"]) for m in body["messages"]] == [("m0", 1), ("m1", 2), ("m3", 3), ("m4", 4)]
    if db_url.startswith("mysql"):
        assert "running it unpacked" in caplog.text


async def test_a_batch_too_big_for_one_commit_packet_is_stored_whole(engines: tuple[Any, Any]) -> None:
    """64 keyed sends of 10,000 characters: their key rows (the rendered responses) pass
    PACKET_BYTES, so the deferred statements go in two packets, the COMMIT with the last."""
    main, engine = engines
    a, b = await _users(main, 2)
    writer = WriterConnection(engine)
    content = "\u00e9'\\" * 3333 + "x"
    drafts = [Draft(a, (b,), content, "text")] * 64
    results = await writer.transaction(
        lambda p: store_drafts(p.conn, drafts, Keys(ttl=60), [_big_once(f"k{i}") for i in range(64)], look=False, packets=p),
        4, packed=True)
    assert sum(len(r.body) for r in results) * 8 > packets.PACKET_BYTES
    assert await _state(main) == ({a: 0, b: 64}, 64, 64, 64)
    async with main.connect() as conn:
        assert set((await conn.execute(sa.select(messages.c.content))).scalars()) == {content}
    await writer.close()


def _big_once(key: str) -> Once:
    return Once(key, "f" * 64, lambda m: Response(201, json.dumps({"id": m["id"], "content": m["content"]})))
