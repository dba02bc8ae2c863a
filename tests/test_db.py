"""Storage details both backends must agree on."""

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from meeting.config import Config
from meeting.db import create_engine, migrate, users
from tests.conftest import base_config
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
