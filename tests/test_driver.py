"""meeting.storage.driver: the send path's statements on the aiomysql connection itself must
behave as SQLAlchemy's execute does: same transaction, same rows, and failures wrapped as
SQLAlchemy wraps them (what the retry and commit-outcome logic look at)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from meeting.config import build_config
from meeting.db import create_engine, users, utcnow
from meeting.storage import driver
from tests.conftest import _mysql_connect


def _engine(url: str) -> Any:
    return create_engine(build_config({"database": {"url": url}}, environ={}).database)


@pytest.fixture
async def engine(mariadb_url: str) -> Any:
    """The driver path is MariaDB's: these tests need no SQLite twin."""
    engine = _engine(mariadb_url)
    yield engine
    await engine.dispose()


async def _user(conn: Any, name: str) -> int:
    result = await conn.execute(users.insert().values(username=name, display_name=name, password_hash="x", created_at=utcnow()))
    return int(result.inserted_primary_key[0])


async def test_only_aiomysql_takes_the_driver_path(db_url: str) -> None:
    engine = _engine(db_url)
    async with engine.connect() as conn:
        assert driver.available(conn) == db_url.startswith("mysql+aiomysql")
    await engine.dispose()


async def test_statements_run_in_the_sqlalchemy_transaction(engine: Any, mariadb_url: str) -> None:
    async with engine.connect() as conn:
        await conn.begin()
        me = await _user(conn, "ann")  # through SQLAlchemy, uncommitted
        await driver.execute(conn, "UPDATE users SET last_seq = last_seq + %s WHERE id IN (%s)", [3, me])
        assert await driver.execute(conn, "SELECT id, last_seq FROM users WHERE id IN (%s) FOR UPDATE", [me]) == [(me, 3)]
        await conn.rollback()
    async with engine.connect() as conn:  # rolled back with it: nothing of either path is left
        assert (await conn.execute(sa.select(sa.func.count()).select_from(users).where(users.c.id == me))).scalar_one() == 0


async def test_a_failure_is_wrapped_as_sqlalchemy_wraps_it(engine: Any, mariadb_url: str) -> None:
    async with engine.connect() as conn:
        await conn.begin()
        me = await _user(conn, "bob")
        with pytest.raises(IntegrityError) as caught:
            await driver.execute(conn, "INSERT INTO users (id, username, display_name, password_hash, created_at) "
                                       "VALUES (%s, 'bob2', 'b', 'x', %s)", [me, driver.stored(utcnow())])
        assert caught.value.orig.args[0] == 1062 and not caught.value.connection_invalidated
        assert not conn.invalidated
        await conn.rollback()


async def test_a_connection_the_server_killed_is_invalidated(engine: Any, mariadb_url: str) -> None:
    async with engine.connect() as conn:
        [(thread,)] = await driver.execute(conn, "SELECT CONNECTION_ID()", [])
        url = make_url(mariadb_url)
        admin = _mysql_connect(url, url.database)
        with admin.cursor() as cur:
            cur.execute(f"KILL CONNECTION {int(thread)}")
        admin.close()
        with pytest.raises(DBAPIError) as caught:
            await driver.execute(conn, "SELECT id FROM users WHERE id IN (%s) FOR UPDATE", [1])
        assert caught.value.connection_invalidated and conn.invalidated
