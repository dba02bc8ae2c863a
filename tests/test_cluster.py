"""Two app instances sharing MariaDB and Redis: what must hold for the deployment, not per process.

- `push.max_connections_per_user` counts a user's devices on every instance;
- a cache invalidation lost by one instance (its path to Redis cut) makes the
  other instance stop serving the entry as soon as the first reaches Redis again.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import pytest

from meeting.config import Config
from meeting.typedefs import cache_key, redis_breaker_key
from tests.conftest import _clean_mariadb, base_config
from tests.helpers import Api, Device
from tests.test_ws import until


@pytest.fixture
def shared(mariadb_url: str, redis_url: str) -> Config:
    _clean_mariadb(mariadb_url)
    return base_config(database={"url": mariadb_url}, redis={"url": redis_url, "prefix": f"t{uuid.uuid4().hex[:10]}"},
                       push={"max_connections_per_user": 2})


async def test_the_connection_cap_holds_across_instances(make_client: Any, shared: Config) -> None:
    a, b = Api(await make_client(shared)), Api(await make_client(shared))
    alice, bob = await a.users(2)
    on_a, on_b = await Device.connect(a, bob), await Device.connect(b, bob)
    await on_a.handshake()
    await on_b.handshake()
    for api in (a, b):  # one device on each instance: the third is refused on either
        assert await (await Device.connect(api, bob)).closed() == 4029
    await on_a.ws.close()

    async def devices() -> int:
        return int((await b.call("GET", f"/users/{bob.id}/presence", user=alice, expect=200))["devices"])

    for _ in range(500):  # the closed device's entry is removed in the background
        if await devices() == 1:
            break
    assert await devices() == 1
    again = await Device.connect(b, bob)
    assert (await again.handshake())["synced"] == {"seq": 0, "count": 0}
    assert await (await Device.connect(a, bob)).closed() == 4029
    assert await devices() == 2


class CuttableProxy:
    """A TCP relay to Redis that the test can cut: while cut, live connections are reset
    and new ones closed at once. The instance behind it sees a real network fault."""

    def __init__(self, target_host: str, target_port: int):
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cut = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._open.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._open.discard(dst)

    def cut_off(self) -> None:
        self.cut = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def close(self) -> None:
        self.cut_off()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[CuttableProxy]:
    from urllib.parse import urlparse

    parsed = urlparse(redis_url)
    relay = CuttableProxy(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    await relay.start()
    yield relay
    await relay.close()


async def test_a_lost_invalidation_on_one_instance_stops_the_other_serving_the_entry(
        make_client: Any, shared: Config, proxy: CuttableProxy, redis_url: str) -> None:
    db = redis_url.rsplit("/", 1)[1]
    via_proxy = base_config(database={"url": shared.database.url},
                            redis={"url": f"redis://127.0.0.1:{proxy.port}/{db}", "prefix": shared.redis.prefix,
                                   "socket_timeout": 0.2})
    a, b = Api(await make_client(via_proxy)), Api(await make_client(shared))
    alice, bob = await b.users(2)
    assert await b.unread_count(bob) == 0   # computed on B and cached in Redis
    hits = b.client.app[cache_key].hits
    assert await b.unread_count(bob) == 0
    assert b.client.app[cache_key].hits == hits + 1  # B now serves it from the cache

    proxy.cut_off()
    await a.send(alice, [bob], "stored while A cannot reach Redis")  # A's invalidation is lost
    assert a.client.app[redis_breaker_key].open
    assert not a.client.app[cache_key].available

    proxy.cut = False  # A's path to Redis is back; nobody sends A a request
    await until(lambda: a.client.app[cache_key].available, timeout=10)
    # A orphaned every entry the moment it reached Redis again: B recomputes.
    assert await b.unread_count(bob) == 1
    assert await a.unread_count(bob) == 1
