"""Storage details both backends must agree on."""

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from meeting.config import Config
from meeting.db import create_engine, migrate, transaction, users
from meeting.errors import Unavailable
from tests.conftest import _clean_mariadb, base_config
from tests.helpers import Api


async def test_migrations_are_idempotent_and_timestamps_keep_microseconds(config: Config) -> None:
    engine = create_engine(config.database)
    try:
        await migrate(engine)
        await migrate(engine)  # second run is a no-op, not an error
        moment = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=8)))
        async with engine.begin() as conn:
            await conn.execute(users.insert().values(username="clock", display_name="时钟 ⏰", password_hash="x", created_at=moment))
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(users.c.created_at, users.c.display_name).where(users.c.username == "clock"))).one()
        assert row.created_at == moment and row.created_at.utcoffset() == dt.timedelta(0)
        assert row.created_at.isoformat() == "2026-01-01T19:04:05.123456+00:00"
        assert row.display_name == "时钟 ⏰"
        async with engine.connect() as conn:
            indexes = await conn.run_sync(lambda c: sa.inspect(c).get_indexes("message_recipients"))
        unread = next(i for i in indexes if i["name"] == "ix_message_recipients_unread")
        assert unread["column_names"] == ["recipient_id", "read_at", "message_id"]
    finally:
        await engine.dispose()


async def test_sqlite_reads_do_not_wait_for_a_writer(make_client: Any, tmp_path: Path) -> None:
    """A transaction holding SQLite's write lock must not block readers (WAL): reads
    begin deferred; only writers take the lock at BEGIN. (SQLite's locking only.)"""
    import sqlite3

    path = tmp_path / "locked.db"
    api = Api(await make_client(base_config(database={"url": f"sqlite+aiosqlite:///{path}"})))
    alice, bob = await api.users(2)
    await api.send(alice, [bob], "before the lock")
    writer = sqlite3.connect(path, isolation_level=None, timeout=1)
    writer.execute("BEGIN IMMEDIATE")  # another process writing, holding the lock
    try:
        inbox = await asyncio.wait_for(api.call("GET", "/messages", user=bob, expect=200), 3)  # busy timeout is 5 s
        assert [m["content"] for m in inbox["messages"]] == ["before the lock"]
        assert await asyncio.wait_for(api.unread_count(bob), 3) == 1
    finally:
        writer.execute("ROLLBACK")
        writer.close()


async def _two_users(engine: Any) -> list[int]:
    async with engine.begin() as conn:
        for name in ("lock_a", "lock_b"):
            await conn.execute(users.insert().values(username=name, display_name=name, password_hash="x", created_at=dt.datetime.now(dt.timezone.utc)))
        return list((await conn.execute(sa.select(users.c.id).where(users.c.username.in_(["lock_a", "lock_b"])).order_by(users.c.id))).scalars())


async def test_a_deadlock_victim_is_run_again_whole(mariadb_url: str) -> None:
    """A real InnoDB deadlock (two transactions locking two rows in opposite orders):
    the victim's work runs again from the start and both commit."""
    _clean_mariadb(mariadb_url)
    engine = create_engine(base_config(database={"url": mariadb_url}).database)
    try:
        first, second = await _two_users(engine)
        both_hold_one = asyncio.Barrier(2)
        attempts = {"forward": 0, "backward": 0}

        def work(name: str, order: list[int]) -> Any:
            async def run(conn: Any) -> str:
                attempts[name] += 1
                lock = sa.select(users.c.id).where(users.c.id == sa.bindparam("id")).with_for_update()
                await conn.execute(lock, {"id": order[0]})
                if attempts[name] == 1:
                    await both_hold_one.wait()  # each holds its first row: the second locks cross
                await conn.execute(lock, {"id": order[1]})
                await conn.execute(users.update().where(users.c.id == order[1]).values(display_name=name))
                return name
            return run

        results = await asyncio.gather(transaction(engine, work("forward", [first, second]), 4),
                                       transaction(engine, work("backward", [second, first]), 4))
        assert results == ["forward", "backward"]
        assert sorted(attempts.values()) == [1, 2]  # exactly one victim, run once more
    finally:
        await engine.dispose()


async def test_lock_wait_timeouts_are_retried_then_answered_503(mariadb_url: str) -> None:
    """1205 (lock wait timeout) is retried too; if every attempt loses, the caller gets a
    retryable Unavailable (503 + Retry-After), not a database error."""
    _clean_mariadb(mariadb_url)
    engine = create_engine(base_config(database={"url": mariadb_url, "lock_wait_timeout": 1}).database)
    try:
        first, _ = await _two_users(engine)
        tries = 0

        async def wants_the_row(conn: Any) -> None:
            nonlocal tries
            tries += 1
            await conn.execute(sa.select(users.c.id).where(users.c.id == first).with_for_update())

        async with engine.connect() as holder:
            await holder.begin()
            await holder.execute(sa.select(users.c.id).where(users.c.id == first).with_for_update())
            with pytest.raises(Unavailable) as raised:
                await transaction(engine, wants_the_row, attempts=2)
            assert tries == 2 and raised.value.status == 503 and raised.value.retry_after
            await holder.rollback()
        await transaction(engine, wants_the_row, 4)  # the row is free again: no retry needed
        assert tries == 3
    finally:
        await engine.dispose()


async def test_a_busy_database_answers_sends_503_at_once_not_item_by_item(make_client: Any, mariadb_url: str, caplog: Any) -> None:
    """Sends that cannot get their recipient's row lock get a retryable 503 with Retry-After
    after `transaction_attempts` waits of `lock_wait_timeout`, and a group-commit batch
    that failed so is not then retried draft by draft (that would multiply the wait)."""
    _clean_mariadb(mariadb_url)
    cfg = base_config(database={"url": mariadb_url, "lock_wait_timeout": 1, "transaction_attempts": 1})
    client = await make_client(cfg)
    api = Api(client)
    alice, bob = await api.users(2)
    engine = create_engine(cfg.database)
    try:
        async with engine.connect() as holder:
            await holder.begin()
            await holder.execute(sa.select(users.c.id).where(users.c.id == bob.id).with_for_update())
            answers = await asyncio.gather(*(client.post("/messages", json={"recipient_ids": [bob.id], "content": f"m{i}"},
                                                         headers=alice.headers) for i in range(4)))
            bodies = [await r.json() for r in answers]
            assert [r.status for r in answers] == [503] * 4, bodies
            assert {b["error"]["code"] for b in bodies} == {"database_busy"} and all(r.headers["Retry-After"] == "1" for r in answers)
            await holder.rollback()
        assert "retrying each alone" not in caplog.text
        assert await api.unread_count(bob) == 0
        await api.send(alice, [bob])  # free again
        assert await api.unread_count(bob) == 1
    finally:
        await engine.dispose()


async def test_reads_on_mariadb_send_no_rollback(mariadb_url: str) -> None:
    """The autocommit read pool: checkouts that read, through the real pool, leave the
    session's ROLLBACK count at 0; the writers' pool, for comparison, sends one per check-in."""
    from meeting.db import readers

    engine = create_engine(base_config(database={"url": mariadb_url, "pool_size": 1}).database)
    show = sa.text("SHOW SESSION STATUS LIKE 'Com_rollback'")
    try:
        for pool in (readers(engine), engine):
            for _ in range(4):
                async with pool.connect() as conn:
                    assert (await conn.execute(sa.select(users.c.id).limit(1))).all() is not None
            async with pool.connect() as conn:
                rollbacks = int((await conn.execute(show)).one()[1])
            if pool is engine:
                assert rollbacks >= 4  # the counter does see the writers' check-in ROLLBACKs
            else:
                assert rollbacks == 0
    finally:
        await engine.dispose()
