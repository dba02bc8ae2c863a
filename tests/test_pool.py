"""meeting.pool: a pooled connection is pinged before use only when it sat idle past
`database.ping_idle`, and one that died meanwhile is replaced, not handed out."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from meeting.db import create_engine
from tests.conftest import _mysql_connect, base_config


def _engine(db_url: str, ping_idle: float) -> tuple[AsyncEngine, list[int]]:
    """The engine as the app makes it, with its dialect's pings counted (and still made)."""
    engine = create_engine(base_config(database={"url": db_url, "ping_idle": ping_idle}).database)
    dialect, pings = engine.sync_engine.dialect, []
    ping = dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(1)
        return ping(dbapi_conn)

    dialect.do_ping = counted  # type: ignore[method-assign]
    return engine, pings


async def _select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text("SELECT 1"))).scalar_one())


async def test_a_connection_back_moments_ago_is_handed_out_without_a_ping(db_url: str) -> None:
    engine, pings = _engine(db_url, ping_idle=60)
    try:
        for _ in range(5):
            assert await _select_one(engine) == 1
        assert pings == []
    finally:
        await engine.dispose()


async def test_an_idle_connection_is_pinged_first(db_url: str) -> None:
    engine, pings = _engine(db_url, ping_idle=0)
    try:
        assert await _select_one(engine) == 1  # a new connection: nothing to ping
        assert pings == []
        assert await _select_one(engine) == 1
        assert await _select_one(engine) == 1
        assert len(pings) == 2
    finally:
        await engine.dispose()


async def test_a_pooled_connection_the_server_killed_is_replaced(mariadb_url: str) -> None:
    engine, pings = _engine(mariadb_url, ping_idle=0)
    try:
        async with engine.connect() as conn:
            thread = int((await conn.execute(sa.text("SELECT CONNECTION_ID()"))).scalar_one())
        url = make_url(mariadb_url)
        admin = _mysql_connect(url, url.database)
        with admin.cursor() as cur:
            cur.execute(f"KILL CONNECTION {thread}")
        admin.close()
        async with engine.connect() as conn:
            assert int((await conn.execute(sa.text("SELECT CONNECTION_ID()"))).scalar_one()) != thread
        assert len(pings) == 1
    finally:
        await engine.dispose()
