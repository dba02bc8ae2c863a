"""A Redis that dies and comes back: the broker reconnects by itself and nothing is lost."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis

from meeting.config import Config, with_overrides
from meeting.typedefs import push_hub_key
from tests.conftest import unavailable
from tests.helpers import Api, Device
from tests.test_main import _free_port


class PrivateRedis:
    """A redis-server of this test's own, so it can be killed without disturbing anything else."""

    def __init__(self, tmp_path: Path):
        self.port = _free_port()
        self.dir = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        client = aioredis.Redis(port=self.port)
        try:
            for _ in range(500):
                try:
                    await client.ping()
                    return
                except (ConnectionError, OSError, aioredis.RedisError):
                    await asyncio.sleep(0.01)
            raise AssertionError("private redis-server did not start")
        finally:
            await client.aclose()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        unavailable("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    if server.proc is not None and server.proc.returncode is None:
        await server.kill()


async def test_the_broker_survives_a_redis_restart_without_losing_a_message(
        make_client: Any, config: Config, private_redis: PrivateRedis) -> None:
    api = Api(await make_client(with_overrides(config, redis={"url": f"redis://127.0.0.1:{private_redis.port}/0", "socket_timeout": 0.2})))
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob)
    await device.handshake()
    await api.send(alice, [bob], "before")
    assert (await device.expect("message.new"))["seq"] == 1
    broker = api.client.app[push_hub_key].broker

    await private_redis.kill()
    for text in ("while down 1", "while down 2"):
        await api.send(alice, [bob], text)  # stored and 201 although Redis is gone
    await private_redis.start()  # same port: the broker's outer loop finds it again
    await asyncio.wait_for(_until(lambda: broker.reconnects >= 1 and broker.connected.is_set()), 20)
    await api.send(alice, [bob], "after")
    got = [(await device.expect("message.new", timeout=10))["seq"] for _ in range(3)]
    assert got == [2, 3, 4]


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.02)
