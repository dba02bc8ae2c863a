"""One fixture per resource. Storage-backed tests run on SQLite and MariaDB.

Services are real. When one is unreachable its tests skip with the reason,
unless MEETING_REQUIRE_SERVICES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any, Iterator

import pymysql
import pytest
import redis
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from meeting.config import Config, build_config, with_overrides
from meeting.db import create_engine, metadata, migrate
from meeting.web import AccessLogger, create_app

from .helpers import Api

REQUIRE_SERVICES = os.environ.get("MEETING_REQUIRE_SERVICES") == "1"
MARIADB_SERVER = os.environ.get("MEETING_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("MEETING_TEST_REDIS", "redis://127.0.0.1:6379/15")
TEST_SECRET = "test-secret-for-the-suite-only-0123456789"


def unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (MEETING_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _mysql_connect(url: Any, database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
                           database=database, connect_timeout=3, charset="utf8mb4", autocommit=True)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A fresh database for this test session, migrated once; dropped at the end."""
    server = make_url(MARIADB_SERVER)
    try:
        conn = _mysql_connect(server)
    except pymysql.err.MySQLError as exc:
        unavailable(f"MariaDB is not reachable at {server.host}:{server.port}: {exc}")
    name = f"meeting_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    url = server.set(database=name).render_as_string(hide_password=False)
    cfg = build_config({"database": {"url": url}}, environ={}).database
    asyncio.run(_migrate(cfg))
    yield url
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


async def _migrate(cfg: Any) -> None:
    engine = create_engine(cfg)
    await migrate(engine)
    await engine.dispose()


def _clean_mariadb(url: str) -> None:
    parsed = make_url(url)
    conn = _mysql_connect(parsed, parsed.database)
    with conn.cursor() as cur:
        for table in reversed(metadata.sorted_tables):
            cur.execute(f"DELETE FROM `{table.name}`")
    conn.close()


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("mariadb_url")
    _clean_mariadb(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


def base_config(**sections: dict[str, Any]) -> Config:
    """Defaults, a test secret, cheap password hashing and no rate limits (tests send far
    faster than a person; tests/test_ratelimit.py turns them on); environment ignored."""
    cfg = build_config({}, environ={})
    cfg = with_overrides(cfg, auth={"secret": TEST_SECRET, "hash_time_cost": 1, "hash_memory_kib": 1024},
                         limits={"enabled": False})
    return with_overrides(cfg, **sections) if sections else cfg


@pytest.fixture
def config(db_url: str) -> Config:
    return base_config(database={"url": db_url})


@pytest.fixture(params=["redis-off", "redis-on", "redis-down"])
def redis_mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Redis settings for tests that must hold with no Redis, a live one, and a dead one."""
    if request.param == "redis-off":
        return {"url": None}
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "redis-on":
        return {"url": request.getfixturevalue("redis_url"), "prefix": prefix}
    return {"url": "redis://127.0.0.1:1/0", "prefix": prefix, "socket_timeout": 0.2}


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    """Serve an app (or a config) the way `python -m meeting` does: with our access logger."""

    async def _make(app_or_config: Any) -> Any:
        app = create_app(app_or_config) if isinstance(app_or_config, Config) else app_or_config
        server = TestServer(app)
        await server.start_server(access_log_class=AccessLogger)
        return await aiohttp_client(server)

    return _make


@pytest.fixture
async def client(make_client: Any, config: Config) -> Any:
    return await make_client(config)


@pytest.fixture
def api(client: Any) -> Api:
    return Api(client)
