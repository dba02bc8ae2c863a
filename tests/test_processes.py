"""Two real `python -m meeting` processes behind no proxy, sharing MariaDB and Redis (or a Redis
Cluster); one is SIGKILLed, one gets SIGTERM mid-burst."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.conftest import TEST_SECRET, _clean_mariadb
from tests.helpers import Device
from tests.test_main import _free_port

HEARTBEAT = 0.5


class Instance:
    def __init__(self, proc: asyncio.subprocess.Process, port: int):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def _start(tmp_path: Path, env: dict[str, str]) -> Instance:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meeting", "--port", str(port), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []

    async def ready() -> None:
        while line := (await proc.stdout.readline()).decode():  # type: ignore[union-attr]
            seen.append(line)
            if f"127.0.0.1:{port}" in line:
                return
        raise AssertionError("instance exited:\n" + "".join(seen))

    await asyncio.wait_for(ready(), 30)
    # keep draining its output so the pipe never blocks the server
    asyncio.get_running_loop().create_task(_drain(proc))
    return Instance(proc, port)


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


def instance_env(mariadb_url: str, redis_url: str, heartbeat: float = HEARTBEAT) -> dict[str, str]:
    """What must match across instances: database, Redis and its prefix, JWT secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETING_")}
    env.update(MEETING_DATABASE_URL=mariadb_url, MEETING_REDIS_URL=redis_url, MEETING_REDIS_PREFIX=f"t{uuid.uuid4().hex[:10]}",
               MEETING_AUTH_SECRET=TEST_SECRET, MEETING_AUTH_HASH_TIME_COST="1", MEETING_AUTH_HASH_MEMORY_KIB="1024",
               MEETING_PUSH_HEARTBEAT=str(heartbeat), MEETING_LIMITS_ENABLED="false", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def heartbeat() -> float:
    return HEARTBEAT


@pytest.fixture(params=["redis", "cluster"])
async def instances(request: pytest.FixtureRequest, tmp_path: Path, mariadb_url: str,
                    heartbeat: float) -> AsyncIterator[list[Instance]]:
    """Two processes on one Redis, then on the local Redis Cluster (sharded pub/sub)."""
    _clean_mariadb(mariadb_url)
    if request.param == "redis":
        env = instance_env(mariadb_url, request.getfixturevalue("redis_url"), heartbeat)
    else:
        env = instance_env(mariadb_url, request.getfixturevalue("redis_cluster").url, heartbeat) | {"MEETING_REDIS_CLUSTER": "true"}
    started = list(await asyncio.gather(_start(tmp_path, env), _start(tmp_path, env)))  # both migrate at once
    yield started
    for instance in started:
        if instance.proc.returncode is None:
            instance.proc.terminate()
            await asyncio.wait_for(instance.proc.wait(), 15)


async def _user(http: aiohttp.ClientSession, name: str) -> dict[str, Any]:
    async with http.post("/auth/register", json={"username": name, "password": "correct horse"}) as r:
        user = await r.json()
    async with http.post("/auth/login", json={"username": name, "password": "correct horse"}) as r:
        user["token"] = (await r.json())["access_token"]
    return user


async def _send(http: aiohttp.ClientSession, sender: dict[str, Any], to: dict[str, Any], text: str) -> None:
    async with http.post("/messages", json={"recipient_ids": [to["id"]], "content": text},
                         headers={"Authorization": f"Bearer {sender['token']}"}) as r:
        assert r.status == 201, await r.text()


async def test_sigkill_one_instance_and_resume_on_the_other(instances: list[Instance]) -> None:
    a, b = instances
    async with aiohttp.ClientSession(a.url) as http_a, aiohttp.ClientSession(b.url) as http_b:
        alice, bob = await _user(http_a, "alice"), await _user(http_a, "bob")
        on_a = Device(await http_a.ws_connect("/ws/messages", params={"token": bob["token"]})).pump()
        on_b = Device(await http_b.ws_connect("/ws/messages", params={"token": bob["token"]})).pump()
        await on_a.handshake()
        await on_b.handshake()
        await _send(http_a, alice, bob, "one")
        await _send(http_b, alice, bob, "two")
        for device in (on_a, on_b):
            assert [(await device.expect("message.new"))["seq"] for _ in range(2)] == [1, 2]

        a.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(a.proc.wait(), 10)

        async def devices() -> int:
            async with http_b.get(f"/users/{bob['id']}/presence", headers={"Authorization": f"Bearer {alice['token']}"}) as r:
                return int((await r.json())["devices"])

        async def until_one_device() -> None:
            while await devices() != 1:
                await asyncio.sleep(0.05)

        # the killed instance never cleaned up: its device drops out within two heartbeats
        await asyncio.wait_for(until_one_device(), 2 * HEARTBEAT + 3)

        for i in range(3):
            await _send(http_b, alice, bob, f"while away {i}")
        resumed = Device(await http_b.ws_connect("/ws/messages", params={"token": bob["token"], "since": "2"})).pump()
        replay = await resumed.resume()
        assert [m["seq"] for m in replay["messages"]] == [3, 4, 5]
        assert replay["synced"]["seq"] == 5
        assert [(await on_b.expect("message.new"))["seq"] for _ in range(3)] == [3, 4, 5]
        await _send(http_b, alice, bob, "after")
        for device in (resumed, on_b):
            assert (await device.expect("message.new"))["seq"] == 6


@pytest.mark.parametrize("heartbeat", [10.0])  # a burst keeps the test's loop busy: no pong missed for it
async def test_sigterm_mid_burst_publishes_every_committed_send_before_closing(instances: list[Instance]) -> None:
    """Instance A takes a burst of POSTs and gets SIGTERM in the middle of it. Every send A
    committed (each 201 and any whose answer the shutdown cut off) reaches bob's device on
    instance B live, in seq order, without a reconnect; bob's device on A gets them too,
    then 1001. (With a fast Redis the outbox is rarely full at the signal: the broker test
    test_closing_the_broker_publishes_its_whole_outbox_first pins that part down.)"""
    a, b = instances
    async with aiohttp.ClientSession(a.url) as http_a, aiohttp.ClientSession(b.url) as http_b:
        alice, bob = await _user(http_a, "alice"), await _user(http_a, "bob")
        on_b = Device(await http_b.ws_connect("/ws/messages", params={"token": bob["token"]})).pump()
        on_a = Device(await http_a.ws_connect("/ws/messages", params={"token": bob["token"]})).pump()
        await on_b.handshake()
        await on_a.handshake()
        answered: list[int] = []
        answered_after_sigterm = 0
        sigterm = asyncio.Event()

        async def sender(worker: int) -> None:
            nonlocal answered_after_sigterm
            for i in range(1000):
                try:
                    async with http_a.post("/messages", json={"recipient_ids": [bob["id"]], "content": f"{worker}-{i}"},
                                           headers={"Authorization": f"Bearer {alice['token']}"}) as r:
                        assert r.status == 201, (r.status, await r.text())  # never a 500 or 503 at shutdown
                        answered.append((await r.json())["id"])
                        answered_after_sigterm += sigterm.is_set()
                except aiohttp.ClientError:
                    return  # A stopped accepting
                if len(answered) >= 40 and not sigterm.is_set():
                    sigterm.set()
                    a.proc.send_signal(signal.SIGTERM)

        await asyncio.wait_for(asyncio.gather(*(sender(w) for w in range(20))), 60)
        assert sigterm.is_set() and await asyncio.wait_for(a.proc.wait(), 30) == 0
        assert answered_after_sigterm > 0  # some answers came after the signal: the instance did not just drop them

        async with http_b.get("/messages", params={"after_seq": "0", "limit": "100"},
                              headers={"Authorization": f"Bearer {bob['token']}"}) as r:
            page = await r.json()
        stored = page["messages"]
        assert page["next_after_seq"] is None
        stored_seqs = [m["seq"] for m in stored]
        assert stored_seqs == list(range(1, len(stored) + 1)) and set(answered) <= {m["id"] for m in stored}
        live = [await on_b.expect("message.new") for _ in stored]
        assert [(m["seq"], m["id"]) for m in live] == [(m["seq"], m["id"]) for m in stored]
        assert not on_b.ws.closed
        local = [await on_a.expect("message.new") for _ in stored]
        assert [m["seq"] for m in local] == stored_seqs
        assert await on_a.closed() == 1001
