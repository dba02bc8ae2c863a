"""`redis.cluster: true` on a real local Redis Cluster (3 masters, 3 replicas): the cache,
presence and rate limits work across instances, and a master killed mid-stream costs no
message and doubles none. (The delivery tests of test_scaleout.py and the broker contract
also run on this cluster.)"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import pytest

from meeting.config import Config
from meeting.typedefs import cache_key, push_hub_key, redis_breaker_key
from tests.conftest import LocalCluster, _clean_mariadb, base_config
from tests.helpers import Api, Device
from tests.test_ratelimit import _refused
from tests.test_scaleout import collect


@pytest.fixture
def on_cluster(mariadb_url: str, redis_cluster: LocalCluster) -> Config:
    _clean_mariadb(mariadb_url)
    # A generous timeout: on a loaded box a slow reply would open the breaker and send
    # everything to the database, which is not what the first test is about.
    return base_config(database={"url": mariadb_url},
                       redis={"url": redis_cluster.url, "cluster": True, "prefix": f"t{uuid.uuid4().hex[:10]}",
                              "socket_timeout": 2.0},
                       limits={"enabled": True, "sends_per_user": "3/minute"})


async def test_cache_presence_and_limits_work_across_instances_on_a_cluster(make_client: Any, on_cluster: Config) -> None:
    a, b = Api(await make_client(on_cluster)), Api(await make_client(on_cluster))
    alice, bob = await a.users(2)
    device = await Device.connect(b, bob)
    await device.handshake()
    await a.send(alice, [bob])
    assert await b.unread_count(bob) == 1
    cache = b.client.app[cache_key]
    hits = cache.hits
    assert await b.unread_count(bob) == 1
    assert cache.hits == hits + 1  # served from the cluster
    await b.send(alice, [bob])  # invalidated on bob's shard by the other instance
    assert await a.unread_count(bob) == 2 and await b.unread_count(bob) == 2
    await a.send(alice, [bob])
    await _refused(await b.client.post("/messages", json={"recipient_ids": [bob.id], "content": "x"}, headers=alice.headers),
                   "sends_per_user")  # the count of sends lives in the cluster, not per instance
    status = await a.call("GET", f"/users/{bob.id}/presence", user=alice, expect=200)
    assert status["online"] and status["devices"] == 1  # the device on b, seen from a
    assert (await a.call("GET", "/healthz", expect=200)) == {"status": "ok", "database": "ok", "redis": "ok"}
    for api in (a, b):  # no script or command crossed slots: nothing ever failed
        assert api.client.app[redis_breaker_key].errors == 0, api.client.app[redis_breaker_key].failures


@pytest.fixture
async def healed(redis_cluster: LocalCluster) -> AsyncIterator[LocalCluster]:
    """The cluster is whole again after the test (the killed node rejoins as a replica)."""
    yield redis_cluster
    for port in redis_cluster.ports:
        if not redis_cluster.alive(port):
            redis_cluster.start(port)
    await asyncio.to_thread(redis_cluster.wait_ok, 60)


async def test_a_master_killed_mid_stream_loses_and_doubles_nothing(make_client: Any, on_cluster: Config,
                                                                    healed: LocalCluster) -> None:
    config = base_config(database=on_cluster.database.__dict__, redis={**on_cluster.redis.__dict__, "socket_timeout": 0.5})
    a, b = Api(await make_client(config)), Api(await make_client(config))
    alice, bob = await a.users(2)
    on_a, on_b = Device(await a.client.ws_connect("/ws/messages", params={"token": bob.token})).pump(), \
        Device(await b.client.ws_connect("/ws/messages", params={"token": bob.token})).pump()
    await on_a.handshake()
    await on_b.handshake()
    hubs = [api.client.app[push_hub_key] for api in (a, b)]
    brokers = [hub.broker for hub in hubs]
    victim = healed.master_of(brokers[0].channel(bob.id))  # the shard carrying bob's frames
    total = 40
    for i in range(total):
        if i == 15:
            healed.kill(victim)  # SIGKILL: no goodbye to clients, its replica takes over
        await (a if i % 2 else b).send(alice, [bob], f"m{i}")  # 201 every time, Redis or not
    for device in (on_a, on_b):
        seqs: list[int] = []
        await asyncio.wait_for(collect(device, total, seqs), 60)
        assert seqs == list(range(1, total + 1))  # in order, each once (collect checks each step)
        await device.ws.send_json({"type": "ping"})
        assert (await device.next(timeout=10))["type"] == "pong"  # and nothing after it: no duplicate
    # Both readers lost the master, subscribed again on its successor and sent their devices to the
    # database (the broker's resync, not only a device noticing a gap in its seqs).
    await _until(lambda: all(broker.reconnects >= 1 and broker.connected.is_set() for broker in brokers), 30)
    await _until(lambda: all(hub.resynced >= 1 for hub in hubs), 30)
    await a.send(alice, [bob], "after the failover")
    for device in (on_a, on_b):
        assert (await device.expect("message.new", timeout=15))["seq"] == total + 1


async def test_a_broker_reconnect_orphans_every_cache_entry(make_client: Any, on_cluster: Config,
                                                            redis_cluster: LocalCluster) -> None:
    """A reconnect may follow a failover that lost acknowledged invalidations (replication is
    asynchronous): the cache epoch is bumped, so no entry cached before it is served again."""
    api = Api(await make_client(on_cluster))
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    assert await api.unread_count(bob) == 1
    cache, broker = api.client.app[cache_key], api.client.app[push_hub_key].broker
    hits, before = cache.hits, cache.epoch
    assert await api.unread_count(bob) == 1 and cache.hits == hits + 1  # cached
    assert await asyncio.to_thread(redis_cluster.kill_pubsub) >= 1
    await _until(lambda: broker.reconnects >= 1 and cache.epoch > before)  # bumped by the reconnect
    misses = cache.misses
    assert await api.unread_count(bob) == 1 and cache.misses == misses + 1  # from the database, under the new epoch


async def test_a_slot_moved_to_another_master_is_followed_there_and_resynced(redis_cluster: LocalCluster) -> None:
    """Resharding: the old owner unsubscribes the broker from the channels of the slot it gave
    away; the broker subscribes again on the new owner and brings its devices up to date."""
    from meeting.cluster_broker import ClusterBroker

    prefix = f"t{uuid.uuid4().hex[:10]}"
    got: list[tuple[int, str]] = []
    resyncs: list[list[int] | None] = []

    async def resync(user_ids: list[int] | None) -> int:
        resyncs.append(user_ids)
        return 1

    here = ClusterBroker(redis_cluster.url, prefix, 2.0, lambda u, seq, frame, at: got.append((seq, frame)), resync,
                         lambda u: u == 7)
    there = ClusterBroker(redis_cluster.url, prefix, 2.0, lambda *_: None, resync, lambda u: False)
    try:
        for broker in (here, there):
            await broker.start()
            await asyncio.wait_for(broker.connected.wait(), 10)
        await here.want(7)
        await there.publish([(7, 1, "before")], 0.0)
        await _until(lambda: got == [(1, "before")])
        channel = here.channel(7)
        source = redis_cluster.master_of(channel)
        target = next(p for p in redis_cluster.masters() if p != source)
        await asyncio.to_thread(redis_cluster.move_slot, redis_cluster.slot_of(channel), source, target)
        await _until(lambda: here.reconnects >= 1 and here.connected.is_set() and resyncs != [])
        assert redis_cluster.master_of(channel) == target
        await there.publish([(7, 2, "after")], 0.0)  # its client follows the MOVED to the new owner
        await _until(lambda: got[-1:] == [(2, "after")])
        assert got == [(1, "before"), (2, "after")]
    finally:
        for broker in (here, there):
            await broker.close()


async def _until(condition: Any, timeout: float = 15.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)


async def test_a_frozen_master_costs_one_socket_timeout_not_two(redis_cluster: LocalCluster, healed: LocalCluster) -> None:
    """redis-py's cluster client retries a timeout whatever supported_errors says (a GET took two
    socket timeouts, a pipeline two and a pause, and closed the shared client); a rate-limit hit
    retried after a timeout could count twice. Every cluster client of ours retries nothing."""
    import os
    import signal
    import time

    from meeting.breaker import REDIS_FAILURES, RedisBreaker
    from meeting.config import LimitsConfig, RedisConfig
    from meeting.ratelimit import RateLimits
    from meeting.redis_client import connect

    timeout = 0.5
    # One client per call, each initialised before the freeze: after a failure a client re-reads
    # the topology first, which costs a timeout of its own when it asks the frozen node.
    getter, piper = connect(redis_cluster.url, True, timeout), connect(redis_cluster.url, True, timeout)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    limits = RateLimits(LimitsConfig(), RedisBreaker(getter, 30.0, timeout),
                        RedisConfig(url=redis_cluster.url, cluster=True, prefix=prefix, socket_timeout=timeout))
    storage = limits._cluster_storage.bridge.storage  # type: ignore[union-attr]
    key = f"{prefix}:frozen"
    try:
        victim = redis_cluster.master_of(key)
        limited = next(f"{prefix}:limits/{n}" for n in range(1000) if redis_cluster.master_of(f"{prefix}:limits/{n}") == victim)
        for client in (getter, piper, storage):
            await client.set(key, "1")  # connected to the victim
        os.kill(redis_cluster.pid(victim), signal.SIGSTOP)
        try:
            elapsed = {}
            for what, call in (("get", lambda: getter.get(key)), ("pipeline", lambda: _pipeline_get(piper, key)),
                               ("limit", lambda: storage.incr(limited))):
                started = time.monotonic()
                with pytest.raises(REDIS_FAILURES):
                    await call()
                elapsed[what] = time.monotonic() - started
        finally:
            os.kill(redis_cluster.pid(victim), signal.SIGCONT)
        assert all(seconds < 1.7 * timeout for seconds in elapsed.values()), elapsed
        await asyncio.to_thread(redis_cluster.wait_ok, 60)  # the frozen master ran what it had queued by now
        # Each client works again (and closes: redis-py's aclose skips a client that awaits re-initialising).
        # Not retrying, a client may fail once more on a connection the freeze (or a failover) made stale.
        # (A freeze past cluster-node-timeout fails the master over: the key may not have reached its replica.)
        for client in (getter, piper, storage):
            assert await _answered(lambda: client.get(key)) in (b"1", None)
        assert int(await storage.get(limited) or 0) <= 1  # a hit that timed out was sent once
    finally:
        await limits.close()
        await getter.aclose()
        await piper.aclose()


async def _answered(call: Any, timeout: float = 20.0) -> Any:
    """The first answer of `call`, tried again after each Redis failure until `timeout`."""
    from meeting.breaker import REDIS_FAILURES

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except REDIS_FAILURES:
            if asyncio.get_running_loop().time() > deadline:
                raise


async def _pipeline_get(client: Any, key: str) -> None:
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        await pipe.execute()
