"""The device stream, frame by frame: ordering of read syncs, catch-up wake-ups and replay
under backpressure. Each test asserts the exact sequence of frames (types and seqs) a
device sees, on SQLite and MariaDB.

Broker faults are made with `Tap`, which sits where the broker hands a frame to this
process's connections (`broker._deliver`, the real delivery path) and can drop or hold
back frames for one user; storage and Redis are never replaced.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from aiohttp.test_utils import TestServer

from meeting.config import Config, with_overrides
from meeting.web import AccessLogger, create_app
from meeting.typedefs import message_service_key, push_hub_key, ws_users
from meeting.ws import UserConnection
from tests.helpers import Api, Device, User, until


def server_conn(api: Api, user: User) -> UserConnection | None:
    conns = api.client.app[ws_users].get(user.id)
    return next(iter(conns)) if conns else None


def shape(frame: dict[str, Any]) -> tuple[Any, ...]:
    """A frame as (type, seqs...) for exact-sequence assertions."""
    kind, payload = frame["type"], frame["payload"]
    if kind == "message.new":
        return (kind, payload["seq"])
    if kind == "message.unread":
        return (kind, tuple(m["seq"] for m in payload["messages"]))
    if kind == "message.synced":
        return (kind, payload["seq"], payload["count"])
    if kind == "message.read":
        return (kind, tuple(payload["ids"]), payload["count"])
    return (kind,)


async def frames_until(device: Device, last: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
    got = []
    while True:
        frame = await device.next(timeout)
        got.append(frame)
        if last(frame):
            return got


async def nothing_more(device: Device) -> None:
    """A ping answered by the very next frame: nothing else was queued for this device."""
    await device.ws.send_json({"type": "ping"})
    assert (await device.next())["type"] == "pong"


class Tap:
    """Drops or holds back, for one user, the frames the broker delivers to this process."""

    def __init__(self, api: Api, user: User):
        self.broker = api.client.app[push_hub_key].broker
        self.user_id = user.id
        self.drop: set[int] = set()      # seqs whose message.new is lost
        self.hold: set[int] = set()      # seqs whose message.new waits until release()
        self.held: list[tuple[int, int, str, float]] = []
        self._deliver = self.broker._deliver
        self.broker._deliver = self._tap

    def _tap(self, user_id: int, seq: int, frame: str, committed_at: float) -> None:
        if user_id == self.user_id and seq in self.drop:
            return
        if user_id == self.user_id and seq in self.hold:
            self.held.append((user_id, seq, frame, committed_at))
            return
        self._deliver(user_id, seq, frame, committed_at)

    def release(self) -> None:
        held, self.held = self.held, []
        for item in held:
            self._deliver(*item)

    def remove(self) -> None:
        self.broker._deliver = self._deliver


def _tiny_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose kernel buffer cannot hide a stalled reader (no autotuning)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def _tiny_send_buffer(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """The server's listening socket; accepted sockets inherit its send buffer, so the
    kernel cannot absorb megabytes for a device that stopped reading (no autotuning)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.bind((host, port))
    return sock


@pytest.fixture
def tight_client(aiohttp_client: Any) -> Callable[[Config], Awaitable[Api]]:
    """An app served the way `python -m meeting` serves it, behind small socket buffers."""
    async def make(config: Config) -> Api:
        server = TestServer(create_app(config), socket_factory=_tiny_send_buffer)
        await server.start_server(access_log_class=AccessLogger)
        return Api(await aiohttp_client(server))
    return make


async def stalled_device(api: Api, user: User, params: dict[str, str]) -> tuple[aiohttp.ClientSession, Device]:
    """A device that reads nothing until the test reads from it."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=_tiny_receive_buffer))
    ws = await session.ws_connect(api.client.make_url("/ws/messages"), params={"token": user.token, **params})
    return session, Device(ws)


async def store_many(api: Api, sender: User, recipient: User, n: int, content: str) -> None:
    """n messages through the service, concurrently (group commit): fast, and the real send path."""
    service = api.client.app[message_service_key]
    for start in range(0, n, 500):
        await asyncio.gather(*(service.send_message(sender.id, [recipient.id], f"{content} {i}")
                               for i in range(start, min(n, start + 500))))


# Bullet 2: read syncs wait for message.synced and never overtake their message

@pytest.fixture
def slow_queue(config: Config) -> Config:
    return with_overrides(config, push={"queue_limit": 4, "backlog_limit": 2000, "queue_bytes": 16 << 20, "backlog_frame_bytes": 8 << 20})  # frames, not bytes, bound here


async def test_a_read_during_a_backlog_comes_after_synced(tight_client: Any, slow_queue: Config) -> None:
    """A read made while the backlog is being sent: one message already queued, one in a
    page not read from the database yet."""
    api = await tight_client(slow_queue)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 1200, "x" * 2000)  # six backlog frames of 200, ~460 KB each
    first = (await api.call("GET", "/messages?after_seq=0&limit=10", user=bob, expect=200))["messages"]
    seq_ids = {m["seq"]: m["id"] for m in first}
    late = (await api.call("GET", "/messages?after_seq=1149&limit=1", user=bob, expect=200))["messages"][0]
    session, device = await stalled_device(api, bob, {})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is None)
    await api.call("POST", "/messages/read", user=bob, json={"ids": [seq_ids[5], late["id"]]}, expect=200)
    got = [shape(f) for f in await frames_until(device, lambda f: f["type"] == "message.read")]
    pages = [tuple(s for s in range(start, start + 200) if s != 1150) for start in range(1, 1201, 200)]
    assert got == [("connected",), *[("message.unread", page) for page in pages],
                   ("message.synced", 1200, 1200), ("message.read", (seq_ids[5], late["id"]), 1198)]
    await nothing_more(device)
    await session.close()


async def test_a_read_during_a_replay_comes_after_synced_and_the_replay_shows_it_read(
        tight_client: Any, slow_queue: Config) -> None:
    api = await tight_client(slow_queue)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 1000, "y" * 2000)  # 2.3 MB of frames: more than the socket buffers hold
    session, device = await stalled_device(api, bob, {"since": "0"})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is not None
                and c.gate.last < 900)
    target = (await api.call("GET", "/messages?after_seq=949&limit=1", user=bob, expect=200))["messages"][0]
    await api.call("POST", f"/messages/{target['id']}/read", user=bob, expect=200)
    got = await frames_until(device, lambda f: f["type"] == "message.read")
    assert [shape(f) for f in got] == [("connected",), *[("message.new", s) for s in range(1, 1001)],
                                       ("message.synced", 1000, 999), ("message.read", (target["id"],), 999)]
    assert [f["payload"]["seq"] for f in got if f["type"] == "message.new" and f["payload"]["read_at"]] == [950]
    await nothing_more(device)
    await session.close()


async def test_a_read_never_overtakes_a_message_held_behind_a_gap(api: Api) -> None:
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob)
    await device.handshake()
    tap = Tap(api, bob)
    tap.hold |= {1, 2}  # both live frames late: the read arrives first
    await api.send(alice, [bob], "one")
    two = await api.send(alice, [bob], "two")
    await api.call("POST", "/messages/read", user=bob, json={"ids": [two["id"]]}, expect=200)
    got = await frames_until(device, lambda f: f["type"] == "message.read")
    assert [shape(f) for f in got] == [("message.new", 1), ("message.new", 2), ("message.read", (two["id"],), 1)]
    assert got[0]["payload"]["read_at"] is None and got[1]["payload"]["read_at"] is not None  # fetched after the read
    tap.release()  # the late live frames are duplicates now
    await nothing_more(device)
    three = await api.send(alice, [bob], "three")
    assert shape(await device.next()) == ("message.new", 3)
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    assert shape(await device.next()) == ("message.read", (got[0]["payload"]["id"], three["id"]), 0)
    tap.remove()


async def test_a_read_before_connected_waits_for_synced(api: Api) -> None:
    """A read committed between the device's registration and its sync point: the backlog
    no longer lists it, and the read frame (harmless) comes after message.synced."""
    alice, bob = await api.users(2)
    one, two = await api.send(alice, [bob], "one"), await api.send(alice, [bob], "two")
    service = api.client.app[message_service_key]
    reading: list[asyncio.Task[Any]] = []
    want = api.client.app[push_hub_key].broker.want

    async def read_while_connecting(user_id: int) -> None:  # runs after registration, before `connected`
        await want(user_id)
        if user_id == bob.id and not reading:
            reading.append(asyncio.create_task(service.mark_read(bob.id, [one["id"]])))
            await reading[0]

    api.client.app[push_hub_key].broker.want = read_while_connecting  # type: ignore[method-assign]
    device = await Device.connect(api, bob)
    got = await frames_until(device, lambda f: f["type"] == "message.read")
    assert [shape(f) for f in got] == [("connected",), ("message.unread", (2,)), ("message.synced", 2, 1),
                                       ("message.read", (one["id"],), 1)]
    assert got[1]["payload"]["messages"][0]["id"] == two["id"]
    await nothing_more(device)


# Bullet 2: catch-up never loses a wake-up, and stops with the socket

async def test_a_gap_noticed_during_a_catch_up_is_filled(api: Api) -> None:
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob)
    await device.handshake()
    conn = server_conn(api, bob)
    assert conn is not None
    fetched, go_on = asyncio.Event(), asyncio.Event()
    real_fetch = conn._fetch
    assert real_fetch is not None

    async def paused_fetch(user_id: int, after: int, limit: int) -> list[dict[str, Any]]:
        rows = await real_fetch(user_id, after, limit)  # the real query; only its answer is delayed
        fetched.set()
        await go_on.wait()
        return rows

    conn._fetch = paused_fetch
    tap = Tap(api, bob)
    tap.drop |= {1, 3}
    await api.send(alice, [bob], "1")
    await api.send(alice, [bob], "2")      # held behind 1: a catch-up starts and reads 1..2
    await asyncio.wait_for(fetched.wait(), 5)
    await api.send(alice, [bob], "3")
    await api.send(alice, [bob], "4")      # held behind 3 while that catch-up runs
    go_on.set()
    got = [shape(await device.next()) for _ in range(4)]
    assert got == [("message.new", s) for s in (1, 2, 3, 4)]
    await nothing_more(device)
    tap.remove()


async def test_a_catch_up_stops_when_the_socket_closes(api: Api) -> None:
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob)
    await device.handshake()
    conn = server_conn(api, bob)
    assert conn is not None
    calls: list[int] = []
    fetched, go_on = asyncio.Event(), asyncio.Event()
    real_fetch = conn._fetch
    assert real_fetch is not None

    async def paused_fetch(user_id: int, after: int, limit: int) -> list[dict[str, Any]]:
        calls.append(after)
        rows = await real_fetch(user_id, after, limit)
        fetched.set()
        await go_on.wait()
        return rows

    conn._fetch = paused_fetch
    tap = Tap(api, bob)
    tap.drop.add(1)
    await api.send(alice, [bob], "1")
    await api.send(alice, [bob], "2")
    await asyncio.wait_for(fetched.wait(), 5)
    await device.ws.close()
    await until(lambda: conn.closed)
    go_on.set()
    await until(lambda: conn._catching_up is None or conn._catching_up.done())
    assert calls == [0] and conn.gate is not None and conn.gate.last == 0  # nothing sent, nothing fetched again
    tap.remove()


# Bullet 3: replay and backlog under backpressure

@pytest.fixture
def small_queue(config: Config) -> Config:
    return with_overrides(config, push={"queue_limit": 40, "queue_bytes": 16 << 20, "backlog_frame_bytes": 8 << 20})


async def test_a_stalled_device_replays_5000_messages_in_order_without_being_closed(
        tight_client: Any, small_queue: Config) -> None:
    api = await tight_client(small_queue)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 5000, "z" * 300)
    session, device = await stalled_device(api, bob, {"since": "0"})
    # The device reads nothing until the server's replay is paused on it: queue over low
    # water, the replay waiting for room, most of the history not even read from the database.
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is not None
                and c.gate.last < 4000)
    conn = server_conn(api, bob)
    assert conn is not None
    seqs = []
    frame = await device.next()
    assert frame["type"] == "connected"
    while (frame := await device.next())["type"] == "message.new":
        seqs.append(frame["payload"]["seq"])
    assert seqs == list(range(1, 5001))
    assert shape(frame) == ("message.synced", 5000, 5000)
    assert conn.high_water <= conn.low_water + conn.page + 1  # memory bounded by the queue, not by history
    await nothing_more(device)
    await session.close()


async def test_replay_stops_paging_once_the_device_is_gone(tight_client: Any, small_queue: Config) -> None:
    api = await tight_client(small_queue)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 2000, "z" * 300)
    session, device = await stalled_device(api, bob, {"since": "0"})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is not None)
    conn = server_conn(api, bob)
    assert conn is not None and conn.gate is not None
    device.ws._response.connection.transport.abort()  # gone without a close frame
    await until(lambda: server_conn(api, bob) is None and conn._queue is None)
    assert conn.gate.last < 2000  # the rest of the history was never read for it
    await session.close()


@pytest.fixture
def backlog_queue(config: Config) -> Config:
    return with_overrides(config, push={"queue_limit": 2, "backlog_limit": 1000, "queue_bytes": 16 << 20, "backlog_frame_bytes": 8 << 20})


async def test_the_connect_backlog_waits_for_room(tight_client: Any, backlog_queue: Config) -> None:
    api = await tight_client(backlog_queue)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 1000, "w" * 2000)
    session, device = await stalled_device(api, bob, {})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is None)
    got = [shape(f) for f in await frames_until(device, lambda f: f["type"] == "message.synced")]
    assert got == [("connected",), *[("message.unread", tuple(range(s, s + 200))) for s in range(1, 1001, 200)],
                   ("message.synced", 1000, 1000)]
    await nothing_more(device)
    await session.close()


# Issue 11: memory bounded in bytes as well as frames

@pytest.fixture
def byte_bound(config: Config) -> Config:
    return with_overrides(config, push={"queue_limit": 1000, "queue_bytes": 64 * 1024, "backlog_frame_bytes": 64 * 1024})


async def test_backlog_frames_are_cut_by_bytes(api: Api, config: Config, make_client: Any) -> None:
    api = Api(await make_client(with_overrides(config, push={"backlog_frame_bytes": 64 * 1024})))
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 30, "x" * 9000)  # about 9.2 KB each: 6 fit in 64 KiB
    device = await Device.connect(api, bob)
    got = [shape(f) for f in await frames_until(device, lambda f: f["type"] == "message.synced")]
    assert got[0] == ("connected",) and got[-1] == ("message.synced", 30, 30)
    assert [seq for _, seqs in got[1:-1] for seq in seqs] == list(range(1, 31))  # every one, once, in order
    unread = [f for f in device.frames if f["type"] == "message.unread"]
    assert len(unread) >= 4 and not any(f["payload"]["has_more"] for f in unread)
    for frame in unread:  # each frame at most the limit, or one message past it
        sizes = [len(json.dumps(m, ensure_ascii=False).encode()) for m in frame["payload"]["messages"]]
        assert sum(sizes[:-1]) <= 64 * 1024


async def test_a_device_that_never_reads_is_closed_by_bytes_long_before_frames(tight_client: Any, byte_bound: Config) -> None:
    api = await tight_client(byte_bound)
    alice, bob = await api.users(2)
    session, device = await stalled_device(api, bob, {})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.gate is not None)
    conn = server_conn(api, bob)
    # 300 live frames of about 9 KB: far under 1000 frames, far over 64 KiB once the
    # socket buffers on both sides are full
    await store_many(api, alice, bob, 300, "y" * 9000)
    await until(lambda: conn.closed)
    assert conn.high_water < 300
    assert conn.queued == 0  # dropped, not held: the device resyncs from the database
    frames = []
    while True:
        msg = await device._receive()
        if msg.type.name != "TEXT":
            break
        frames.append(msg)
    assert device.ws.close_code == 1013 or msg.data == 1013
    await session.close()


async def test_a_replay_of_large_messages_is_paced_by_bytes_not_closed(tight_client: Any, byte_bound: Config) -> None:
    api = await tight_client(byte_bound)
    alice, bob = await api.users(2)
    await store_many(api, alice, bob, 150, "z" * 9000)  # 1.4 MB of history through a 64 KiB queue
    session, device = await stalled_device(api, bob, {"since": "0"})
    await until(lambda: (c := server_conn(api, bob)) is not None and c.waiting_for_room and c.gate is not None)
    got = [shape(f) for f in await frames_until(device, lambda f: f["type"] == "message.synced")]
    assert got == [("connected",), *[("message.new", s) for s in range(1, 151)], ("message.synced", 150, 150)]
    await nothing_more(device)
    await session.close()
