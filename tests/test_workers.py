"""`python -m meeting --workers 2`: two real worker processes on one port (SO_REUSEPORT) under
a supervisor, sharing MariaDB and Redis. Which worker serves a socket is read from /proc
(the server-side end of the TCP connection and the process holding it), not guessed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests.conftest import _clean_mariadb
from tests.helpers import Device
from tests.test_main import _free_port
from tests.test_processes import _send, _user, instance_env
from tests.test_scaleout import collect

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets' owners from Linux /proc")


class Supervised:
    """The supervisor process, its output, and the workers it says it started."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output: list[str] = []
        self.workers: dict[int, int] = {}  # worker index -> its current pid
        self.changed = asyncio.Event()

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode():
            self.output.append(line)
            if started := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
                self.workers[int(started[1])] = int(started[2])
            self.changed.set()

    async def until(self, condition: Any, timeout: float = 30) -> None:
        async def wait() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError("supervisor output:\n" + "".join(self.output)) from None

    def serving(self) -> int:
        return sum(f"http://127.0.0.1:{self.port}" in line for line in self.output)


def server_pid(ws: aiohttp.ClientWebSocketResponse, port: int, pids: list[int]) -> int:
    """The worker holding the server end of this WebSocket's TCP connection."""
    client_port = ws.get_extra_info("sockname")[1]
    inode = None
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if int(fields[1].split(":")[1], 16) == port and int(fields[2].split(":")[1], 16) == client_port:
            inode = fields[9]
    assert inode is not None, "the server end of the socket is not in /proc/net/tcp"
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker of {pids} holds socket {inode}")


@pytest.fixture
async def supervised(tmp_path: Path, mariadb_url: str, redis_url: str) -> AsyncIterator[Supervised]:
    _clean_mariadb(mariadb_url)
    env = instance_env(mariadb_url, redis_url, heartbeat=30.0) | {"MEETING_PUSH_MAX_CONNECTIONS_PER_USER": "100"}
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meeting", "--workers", "2", "--port", str(port),
                                                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    server = Supervised(proc, port)
    reader = asyncio.create_task(server.read())
    await server.until(lambda: server.serving() >= 2 and len(server.workers) == 2)
    yield server
    workers = set(server.workers.values())  # never leave a worker behind, whatever the test did
    if proc.returncode is None:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers.update(int(pid) for pid in (children.read_text().split() if children.exists() else []))
        proc.kill()
        await proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    await asyncio.wait_for(reader, 30)  # EOF once no worker holds the pipe


async def test_two_workers_one_port_every_message_once_and_a_killed_worker_costs_nothing(supervised: Supervised) -> None:
    server = supervised
    # force_close: a pooled keep-alive connection to a worker that is killed would fail the next POST.
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(force_close=True)) as http:
        alice, bob = await _user(http, "alice"), await _user(http, "bob")
        devices: list[tuple[Device, int]] = []
        while len({pid for _, pid in devices}) < 2:  # the kernel spreads connections; connect until both serve
            assert len(devices) < 40, "every connection went to one worker"
            ws = await http.ws_connect("/ws/messages", params={"token": bob["token"]})
            devices.append((Device(ws).pump(), server_pid(ws, server.port, list(server.workers.values()))))
        for device, _ in devices:
            await device.handshake()
        for i in range(10):
            await _send(http, alice, bob, f"m{i}")
        seen: dict[int, list[int]] = {}
        for n, (device, _) in enumerate(devices):
            seen[n] = []
            await collect(device, 10, seen[n])
            assert seen[n] == list(range(1, 11))

        victim = devices[0][1]
        os.kill(victim, signal.SIGKILL)
        # Until it is dead its listening socket still takes a share of new connections, which
        # the kernel then resets (a client retries those); the test sends once the supervisor
        # reaped it, when its sockets are certainly closed.
        await server.until(lambda: any(f"(pid {victim}) exited" in line for line in server.output))
        for i in range(10, 20):  # the surviving worker takes every new connection meanwhile
            await _send(http, alice, bob, f"m{i}")
        for n, (device, pid) in enumerate(devices):
            if pid == victim:  # dropped with its worker: reconnect with `since`, as the client does
                assert await device.closed(timeout=10) is not None
                ws = await http.ws_connect("/ws/messages", params={"token": bob["token"], "since": str(seen[n][-1])})
                device = Device(ws).pump()
                replay = await device.resume()
                seen[n].extend(m["seq"] for m in replay["messages"])
                devices[n] = (device, pid)
            await collect(device, 20, seen[n])
            assert seen[n] == list(range(1, 21))  # nothing missed, nothing twice

        index = next(i for i, pid in server.workers.items() if pid == victim)
        await server.until(lambda: server.workers[index] != victim and server.serving() >= 3)
        fresh = server.workers[index]
        for _ in range(40):  # the restarted worker serves again: connect until a socket lands on it
            ws = await http.ws_connect("/ws/messages", params={"token": bob["token"], "since": "20"})
            if server_pid(ws, server.port, list(server.workers.values())) == fresh:
                break
            await ws.close()
        else:
            raise AssertionError("no connection reached the restarted worker")
        newcomer = Device(ws).pump()
        assert (await newcomer.resume())["synced"]["seq"] == 20
        await _send(http, alice, bob, "after the restart")
        for device, _ in [*devices, (newcomer, fresh)]:
            assert (await device.expect("message.new"))["seq"] == 21

        # SIGTERM with sends in flight. A worker drains: the sends it took finish and reach its own
        # devices, then 1001. (A frame from the other worker can come after this worker closed:
        # that device resumes it with `since` on its next connection.) Both workers hold devices.
        answered: list[int] = []

        async def keep_sending() -> None:
            for i in range(200):
                try:
                    await _send(http, alice, bob, f"late {i}")
                except (aiohttp.ClientError, AssertionError):  # refused once the workers drain
                    return
                answered.append(i)

        sender = asyncio.create_task(keep_sending())
        deadline = asyncio.get_running_loop().time() + 30
        while not answered:  # sends are flowing
            assert asyncio.get_running_loop().time() < deadline and not sender.done(), "no send was answered"
            await asyncio.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(sender, 60)
        last = 21 + len(answered)
        got: set[int] = set()
        for device, _ in [*devices, (newcomer, fresh)]:
            seqs, code = await _until_closed(device)
            assert code == 1001
            assert seqs == list(range(22, 22 + len(seqs)))  # in order, once, no gap
            got.update(seqs)
        assert set(range(22, last + 1)) <= got, (sorted(got), last)  # every answered send reached a device

    assert await asyncio.wait_for(server.proc.wait(), 40) == 0
    for pid in server.workers.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def _until_closed(device: Device) -> tuple[list[int], int]:
    """The seqs of the message.new frames a device reads until the server closes it, and the code."""
    seqs: list[int] = []
    while True:
        msg = await asyncio.wait_for(device._receive(), 30)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return seqs, int(msg.data)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
        frame = json.loads(msg.data)
        if frame["type"] == "message.new":
            seqs.append(frame["payload"]["seq"])


async def test_more_than_one_worker_without_redis_is_refused_with_the_reason(tmp_path: Path) -> None:
    from tests.test_main import _run

    code, out = await _run(tmp_path, "--workers", "2")
    assert code == 2
    assert "--workers 2 needs redis.url" in out and "Traceback" not in out
    # A secret the workers could not read stops the supervisor itself, before any worker starts.
    code, out = await _run(tmp_path, "--workers", "2", MEETING_REDIS_URL="redis://127.0.0.1:1/0", MEETING_AUTH_SECRET="",
                           MEETING_AUTH_SECRET_FILE=str(tmp_path / "missing.secret"),
                           MEETING_DATABASE_URL="mysql+aiomysql://root@127.0.0.1:1/unused")  # (SQLite is refused first)
    assert code == 2
    assert "auth.secret_file: cannot read" in out and "worker 0 started" not in out and "Traceback" not in out


@pytest.mark.parametrize("database", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///shared.db"])
async def test_more_than_one_worker_on_sqlite_is_refused_with_the_reason(tmp_path: Path, database: str) -> None:
    """In memory, each worker would have its own users sharing one secret and Redis (ids collide: one
    user's token opens another's account); a file would be written by several processes untested."""
    from tests.test_main import _run

    code, out = await _run(tmp_path, "--workers", "2", MEETING_REDIS_URL="redis://127.0.0.1:1/0",
                           MEETING_DATABASE_URL=database)
    assert code == 2, out
    assert "--workers 2 needs MariaDB/MySQL" in out and "worker 0 started" not in out and "Traceback" not in out


async def test_a_stop_while_a_crashed_worker_waits_for_its_restart_exits_0(tmp_path: Path) -> None:
    """SIGTERM during the restart backoff is a requested stop like any other: exit 0, not the
    dead worker's code. (The worker crashes at start: its database does not answer.)"""
    from tests.test_main import _env

    env = _env(tmp_path, MEETING_DATABASE_URL="mysql+aiomysql://root@127.0.0.1:1/meeting", MEETING_DATABASE_CONNECT_TIMEOUT="1")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meeting", "--workers", "1", "--port", str(_free_port()),
                                                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    server = Supervised(proc, 0)
    reader = asyncio.create_task(server.read())
    try:
        # The first restart waits 1 s: the stop lands in it.
        await server.until(lambda: any("restarting it" in line for line in server.output))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(server.output)
        await asyncio.wait_for(reader, 10)
        assert sum("worker 0 started" in line for line in server.output) == 1  # the stop came in the backoff
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
