"""Redis frozen (SIGSTOP), then killed and restarted, under two app instances sharing it.

Redis is an accelerator: while it is out, sends answer at their usual speed, the
instance that stored a message pushes it live to its own devices, /healthz says
degraded, and the other instance's devices catch up as soon as Redis is back;
every device ends with every frame exactly once, in seq order.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

from meeting.config import Config, with_overrides
from meeting.typedefs import cache_key, push_hub_key, redis_breaker_key, rooms_key
from tests.faults import PubSubCutter
from tests.helpers import Api, Device
from tests.test_broker_restart import PrivateRedis, private_redis  # noqa: F401  (fixture)
from tests.test_ws import until


async def frames_until_seq(device: Device, last: int) -> list[tuple[str, int]]:
    """Every frame up to the message.new with seq `last`, as (type, seq)."""
    seen: list[tuple[str, int]] = []
    while not seen or seen[-1] != ("message.new", last):
        frame = await device.next(timeout=10)
        seen.append((frame["type"], frame["payload"].get("seq", 0)))
    return seen


async def frames_until_pong(device: Device) -> list[tuple[str, int]]:
    """Every frame up to the answer to a ping: proves nothing else was queued before it."""
    await device.ws.send_json({"type": "ping"})
    seen: list[tuple[str, int]] = []
    while (frame := await device.next(timeout=10))["type"] != "pong":
        seen.append((frame["type"], frame["payload"].get("seq", 0)))
    return seen


async def test_a_frozen_then_restarted_redis_slows_no_send_and_stops_no_local_push(
        make_client: Any, config: Config, private_redis: PrivateRedis) -> None:  # noqa: F811
    cfg = with_overrides(config, redis={"url": f"redis://127.0.0.1:{private_redis.port}/0",
                                        "prefix": f"t{uuid.uuid4().hex[:10]}", "socket_timeout": 0.2})
    a, b = Api(await make_client(cfg)), Api(await make_client(cfg))
    alice, bob = await a.users(2)
    on_a, on_b = await Device.connect(a, bob), await Device.connect(b, bob)
    await on_a.handshake()
    await on_b.handshake()
    first = await a.send(alice, [bob], "before")
    for device in (on_a, on_b):
        assert (await device.expect("message.new"))["seq"] == 1
    assert first["id"]

    breaker, cache = a.client.app[redis_breaker_key], a.client.app[cache_key]

    def on_the_send_path() -> tuple[int, dict[str, int]]:
        """Redis failures seen by the request path (the cache, the rate limits, presence):
        with the breaker open nothing there may try Redis, so they must stay put. The
        brokers' background tasks keep trying on their own: their failures do not count."""
        return cache.errors, {what: n for what, n in breaker.failures.items() if "broker" not in what}

    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    took: list[float] = []
    ids: dict[int, int] = {}
    for seq in range(2, 8):
        if seq == 3:  # the first send pays one socket timeout and opens the breaker; from here on
            assert breaker.open  # no send may send a command to Redis
            before = on_the_send_path()
        started = time.monotonic()
        sent = await a.send(alice, [bob], f"frozen {seq}")
        took.append(time.monotonic() - started)
        payload = await on_a.expect("message.new", timeout=3)  # live, while Redis does not answer
        assert payload["seq"] == seq and payload["id"] == sent["id"]
        ids[seq] = sent["id"]
    assert on_the_send_path() == before
    assert max(took[1:]) < 2.0, took  # secondary: the counters above say no send waited on Redis
    assert await a.call("GET", "/healthz", expect=200) == {"status": "degraded", "database": "ok", "redis": "unavailable"}
    marked = await a.call("POST", "/messages/read", user=bob, json={"ids": [ids[2]]}, expect=200)
    assert marked == {"updated": 1, "count": 6}
    assert await on_a.expect("message.read", timeout=3) == {"ids": [ids[2]], "count": 6}

    await private_redis.kill()  # mid-stream: the frozen server dies, its sockets are reset
    for seq in (8, 9):
        started = time.monotonic()
        await a.send(alice, [bob], f"dead {seq}")
        assert time.monotonic() - started < 2.0
        assert (await on_a.expect("message.new", timeout=3))["seq"] == seq
    assert breaker.open and on_the_send_path() == before
    await private_redis.start()  # same port

    brokers = [api.client.app[push_hub_key].broker for api in (a, b)]
    await until(lambda: all(api.client.app[redis_breaker_key].available for api in (a, b))
                and all(br.connected.is_set() and br.reconnects >= 1 for br in brokers), timeout=20)
    await a.send(alice, [bob], "after")
    # Instance B was cut off from everything sent meanwhile: it catches up from the
    # database once Redis answers, then gets the next message live.
    assert await frames_until_seq(on_b, 10) == [("message.new", seq) for seq in range(2, 11)]
    # Instance A's device saw everything live; nothing came twice (no Redis echo of the
    # frames it delivered itself, no resync replay), the read included.
    assert await frames_until_seq(on_a, 10) == [("message.new", 10)]
    for device in (on_a, on_b):
        assert await frames_until_pong(device) == []
    health = await b.call("GET", "/healthz", expect=200)
    assert health == {"status": "ok", "database": "ok", "redis": "ok"}


async def test_a_frozen_redis_is_noticed_by_the_pubsub_reader(
        make_client: Any, config: Config, private_redis: PrivateRedis) -> None:  # noqa: F811
    """SIGSTOP leaves every socket open and silent: only the reader's PING finds out."""
    cfg = with_overrides(config, redis={"url": f"redis://127.0.0.1:{private_redis.port}/0",
                                        "prefix": f"t{uuid.uuid4().hex[:10]}", "socket_timeout": 0.2})
    api = Api(await make_client(cfg))
    broker = api.client.app[push_hub_key].broker
    await asyncio.wait_for(broker.connected.wait(), 5)
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)
    try:
        await until(lambda: not broker.connected.is_set(), timeout=10)
        assert (await api.call("GET", "/healthz", expect=200))["status"] == "degraded"
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    await until(lambda: broker.connected.is_set() and broker.reconnects == 1, timeout=15)
    await until(lambda: api.client.app[redis_breaker_key].available, timeout=5)
    rooms = api.client.app[rooms_key].broker  # its reader may have noticed the freeze too: /healthz waits for it
    await until(lambda: rooms.healthy and rooms.connected.is_set(), timeout=15)
    assert (await api.call("GET", "/healthz", expect=200))["status"] == "ok"


async def test_healthz_is_degraded_while_the_room_broker_is_disconnected(
        make_client: Any, config: Config, private_redis: PrivateRedis) -> None:  # noqa: F811
    """Only the room broker's reader is cut (its reconnection held for its 2 s timeout):
    the breaker is still closed and the push broker connected, yet rooms no longer span
    instances, so /healthz must say degraded; and ok again once the room reader is back."""
    cutter = PubSubCutter("127.0.0.1", private_redis.port, b":room:")
    port = await cutter.start()
    try:
        cfg = with_overrides(config, redis={"url": f"redis://127.0.0.1:{port}/0",
                                            "prefix": f"t{uuid.uuid4().hex[:10]}", "socket_timeout": 0.2})
        api = Api(await make_client(cfg))
        app = api.client.app
        breaker, rooms = app[redis_breaker_key], app[rooms_key].broker
        org, bob = await api.users(2)
        meeting = await api.call("POST", "/meetings", user=org, json={"title": "t", "participant_ids": [bob.id]}, expect=201)
        ws = await api.client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": org.token})
        await until(lambda: bool(cutter.tagged), timeout=5)  # the room reader follows the meeting's channel
        ok = {"status": "ok", "database": "ok", "redis": "ok"}
        assert await api.call("GET", "/healthz", expect=200) == ok
        cutter.cut()
        await until(lambda: not rooms.healthy, timeout=5)
        health = await api.call("GET", "/healthz", expect=200)
        assert not breaker.open and app[push_hub_key].broker.healthy  # only the room broker is out
        assert health == {"status": "degraded", "database": "ok", "redis": "unavailable"}
        cutter.release()
        await until(lambda: rooms.healthy and rooms.connected.is_set() and breaker.available, timeout=15)
        assert await api.call("GET", "/healthz", expect=200) == ok
        await ws.close()
    finally:
        await cutter.close()
