"""What every scenario needs: users, and receiving devices in a separate process so that the
load generator is not the bottleneck it measures. The same client code drives `meeting` and the
yardstick; DIALECTS holds the two things they differ in."""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import sys
import time
import uuid
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

import aiohttp


async def make_users(url: str, count: int, concurrency: int = 16) -> list[dict[str, Any]]:
    """Register and log in `count` fresh users; returns [{"id", "token"}]."""
    tag = uuid.uuid4().hex[:8]
    gate = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession, i: int) -> dict[str, Any]:
        body = {"username": f"b{tag}{i}", "password": "bench-password"}
        async with gate:
            async with http.post("/auth/register", json=body) as r:
                user = await r.json()
                if r.status != 201:
                    raise RuntimeError(f"register failed: {user}")
            async with http.post("/auth/login", json=body) as r:
                return {"id": user["id"], "token": (await r.json())["access_token"]}

    async with aiohttp.ClientSession(url) as http:
        return list(await asyncio.gather(*(one(http, i) for i in range(count))))


# How a device authenticates, and which frame ends its sync (everything before it is the backlog,
# everything after it live). `meeting` takes the token as a subprotocol, as browsers should, and
# ends with message.synced; the toy takes ?token= only and has no seq, since or message.synced:
# its single message.unread frame is all it sends before live frames.
DIALECTS: dict[str, tuple[str, str]] = {"meeting": ("subprotocol", "message.synced"), "toy": ("query", "message.unread")}


# -- receiving devices, in their own process ---------------------------------------------

class Devices:
    """Our end of the receiver process: its pid (the CPU meter reads it) and the conversation
    with it, one step per method, in the order a scenario uses them."""

    def __init__(self, pipe: Connection, pid: int | None) -> None:
        self.pipe, self.pid = pipe, pid

    async def ready(self, timeout: float, on_start: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Let every device connect and wait until all are synced (or failed). `on_start` runs
        just before the receiver starts its connect timer (`connect_seconds`)."""
        await self._expect("connecting", timeout)
        on_start()
        self.pipe.send(("go",))
        return (await self._expect("ready", timeout))[1]

    async def ping(self, timeout: float = 60) -> int:
        """Every device pings; how many pongs came back within 30 s."""
        self.pipe.send(("ping",))
        return int((await self._expect("pinged", timeout))[1])

    async def collect(self, expected: int, timeout: float,
                      on_delivered: Callable[[], None] = lambda: None) -> tuple[list[tuple[int, int, float]], dict[str, float]]:
        """Wait until `expected` message.new frames arrived (or `timeout` passed): `on_delivered`
        runs then, before the devices disconnect; returns [(message_id, device, received_at)] and
        the receiver's health."""
        self.pipe.send((expected, timeout))
        await self._expect("delivered", timeout + 60)
        on_delivered()
        _, frames, health = await self._expect("frames", 120)
        return frames, health

    async def _expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        message = await wait_pipe(self.pipe, timeout)
        assert message[0] == kind, (kind, message[0])
        return message


@contextmanager
def receivers(url: str, tokens: list[str], dialect: str = "meeting") -> Iterator[Devices]:
    """Device i connects with tokens[i], in a separate process, which is reaped on exit.
    Yields a Devices: the way to talk to that process. A device that cannot connect is counted
    in "failed", so its copies show as lost instead of hanging the run."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(url, tokens, theirs, dialect), daemon=True)
    proc.start()
    try:
        yield Devices(ours, proc.pid)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def _receiver_main(url: str, tokens: list[str], pipe: Connection, dialect: str) -> None:
    """The receiving devices are load, not what is measured: their process runs without the
    cyclic garbage collector. With it, over 10,000 sockets' objects, it spent 3.3-3.5 s of a
    connect storm's CPU in collections and stalled its loop for up to ~0.6 s at a time, during
    which it sent no upgrade and read no frame, so the storms measured the client's collector
    more than either server (docs/performance.md, "Connect 10,000"). A run is short, and what
    it does not free goes with the process; `receiver_gc_collections` in every result shows it
    stayed off."""
    gc.disable()
    asyncio.run(_receive(url, tokens, pipe, dialect))


async def _receive(url: str, tokens: list[str], pipe: Connection, dialect: str) -> None:
    from .stats import ClientHealth

    auth, last_sync_frame = DIALECTS[dialect]

    frames: list[tuple[int, int, float]] = []
    health = ClientHealth()
    health.start()
    gate = asyncio.Semaphore(200)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: commands.put_nowait(pipe.recv()))
    enough = asyncio.Event()
    expected = [float("inf")]
    handshakes: list[float] = []
    pongs = [0]
    received = [0]  # bytes of text frames (UTF-8), all devices together
    all_ponged = asyncio.Event()
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=connector) as http:
        synced: list[asyncio.Future[None]] = [loop.create_future() for _ in tokens]
        pipe.send(("connecting",))  # the sender starts its CPU meter, then says go
        assert await commands.get() == ("go",)
        started = time.monotonic()

        failures: list[str] = []

        async def device(i: int, token: str) -> None:
            """A device that cannot connect, or whose socket dies, is counted, not waited for:
            its copies show up as lost instead of the run hanging until a timeout."""
            try:
                await _device(i, token)
            except Exception as exc:
                failures.append(f"device {i}: {type(exc).__name__}: {exc}")
            finally:
                if not synced[i].done():
                    synced[i].set_result(None)

        async def _device(i: int, token: str) -> None:
            async with gate:
                began = time.monotonic()
                if auth == "subprotocol":
                    ws = await http.ws_connect("/ws/messages", protocols=("bearer", token), heartbeat=None, max_msg_size=0)
                else:
                    ws = await http.ws_connect("/ws/messages", params={"token": token}, heartbeat=None, max_msg_size=0)
                handshakes.append(time.monotonic() - began)
            sockets.append(ws)
            async for msg in ws:
                now = time.time()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                received[0] += len(msg.data) if msg.data.isascii() else len(msg.data.encode())
                # `type` is the first key of both servers' frames: '{"type":"x"' or '{"type": "x"'.
                kind = msg.data[:48].split('"', 4)[3]
                if kind == "message.new":
                    payload = json.loads(msg.data)["payload"]
                    frames.append((payload["id"], i, now))
                    if len(frames) >= expected[0]:
                        enough.set()
                elif kind == "message.unread":  # the backlog counts as delivered too
                    frames.extend((m["id"], i, now) for m in json.loads(msg.data)["payload"]["messages"])
                elif kind == "pong":
                    pongs[0] += 1
                    if pongs[0] == len(tokens):
                        all_ponged.set()
                if kind == last_sync_frame and not synced[i].done():
                    synced[i].set_result(None)

        tasks = [loop.create_task(device(i, t)) for i, t in enumerate(tokens)]
        await asyncio.gather(*synced)
        if failures:
            print(f"{len(failures)} device(s) failed, e.g. {failures[:3]}", file=sys.stderr)
        pipe.send(("ready", {"devices": len(tokens), "connect_seconds": time.monotonic() - started, "handshakes": handshakes,
                             "failed": len(failures), "bytes": received[0]}))
        if (command := await commands.get()) == ("ping",):  # does every socket still answer?
            await asyncio.gather(*(ws.send_str('{"type":"ping"}') for ws in sockets), return_exceptions=True)
            try:
                await asyncio.wait_for(all_ponged.wait(), 30)
            except asyncio.TimeoutError:
                pass
            pipe.send(("pinged", pongs[0]))
            command = await commands.get()
        expected[0], timeout = command
        if len(frames) >= expected[0]:
            enough.set()
        try:
            await asyncio.wait_for(enough.wait(), timeout)
        except asyncio.TimeoutError:
            pass  # what is missing is reported as lost
        pipe.send(("delivered", len(frames)))  # the sender stops its CPU meter: the rest is teardown
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(("frames", frames, await health.stop()))


async def wait_pipe(pipe: Connection, timeout: float) -> Any:
    """Await one object from a multiprocessing pipe without blocking the loop."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pipe.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(pipe.fileno())
    return pipe.recv()
