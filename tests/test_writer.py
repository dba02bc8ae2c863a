"""The group commit keeps its connection between transactions (meeting.writer): a kept
connection the server closed meanwhile must cost no send, and sends must not take a
pool checkout each."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url

from meeting.config import Config
from meeting.typedefs import engine_key
from tests.conftest import _mysql_connect, base_config
from tests.helpers import Api


def _checkouts(api: Api) -> list[int]:
    seen: list[int] = []
    event.listen(api.client.server.app[engine_key].sync_engine, "checkout", lambda *args: seen.append(1))
    return seen


async def test_sends_in_a_row_reuse_the_writer_connection(make_client: Any, config: Config) -> None:
    api = Api(await make_client(config))
    alice, bob = await api.users(2)
    await api.send(alice, [bob], "first")
    checkouts = _checkouts(api)
    for i in range(5):
        assert (await api.send(alice, [bob], f"again {i}"))["recipient_ids"] == [bob.id]
    assert checkouts == []


async def test_a_kept_connection_the_server_killed_costs_no_send(make_client: Any, mariadb_url: str) -> None:
    """Every connection of the app is killed server-side (as by a restart): the next send
    is stored once and answered 201, and a send after it too."""
    api = Api(await make_client(base_config(database={"url": mariadb_url})))
    alice, bob = await api.users(2)
    await api.send(alice, [bob], "before")
    url = make_url(mariadb_url)
    admin = _mysql_connect(url, url.database)
    with admin.cursor() as cur:
        cur.execute("SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()", (url.database,))
        for (thread,) in cur.fetchall():
            cur.execute(f"KILL CONNECTION {int(thread)}")
    admin.close()
    first = await api.send(alice, [bob], "after the kill")
    second = await api.send(alice, [bob], "and again")
    body = await api.call("GET", "/messages", user=bob, expect=200)
    assert [m["content"] for m in body["messages"]] == ["and again", "after the kill", "before"]
    assert second["id"] > first["id"]


async def test_the_kept_connection_leaves_room_for_reads_with_a_pool_of_one(make_client: Any, tmp_path: Any) -> None:
    """SQLite's pool has no overflow: with `pool_size: 1` the kept connection must not be the only one."""
    api = Api(await make_client(base_config(database={"url": f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", "pool_size": 1})))
    alice, bob = await api.users(2)
    await api.send(alice, [bob], "hi")
    body = await asyncio.wait_for(api.call("GET", "/messages", user=bob, expect=200), 10)
    assert [m["content"] for m in body["messages"]] == ["hi"]
