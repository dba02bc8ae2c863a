"""Two app instances sharing MariaDB and Redis: delivery, read sync, presence, broker faults.

Every test that uses instances `a` and `b` runs twice: on one Redis, and on the local
Redis Cluster (`redis.cluster`, sharded pub/sub) where the same must hold."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from meeting.config import Config
from meeting.typedefs import push_hub_key, ws_users
from tests.conftest import _clean_mariadb, base_config
from tests.helpers import Api, Device, User
from tests.test_ws import until


@pytest.fixture(params=["redis", "cluster"])
def redis_setup(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One Redis, or the local Redis Cluster; a fresh prefix either way."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "redis":
        return {"url": request.getfixturevalue("redis_url"), "prefix": prefix}
    return {"url": request.getfixturevalue("redis_cluster").url, "cluster": True, "prefix": prefix}


@pytest.fixture
def shared(mariadb_url: str, redis_setup: dict[str, Any]) -> Config:
    """What two instances must share: the database, Redis and its prefix (and the JWT secret)."""
    _clean_mariadb(mariadb_url)
    return base_config(database={"url": mariadb_url}, redis=redis_setup)


@pytest.fixture
async def a(make_client: Any, shared: Config) -> Api:
    return Api(await make_client(shared))


@pytest.fixture
async def b(make_client: Any, shared: Config) -> Api:
    return Api(await make_client(shared))


async def collect(device: Device, upto_seq: int, seen: list[int]) -> None:
    """Read message.new frames until `upto_seq`, checking they come once each, in order."""
    while not seen or seen[-1] < upto_seq:
        frame = await device.next(timeout=10)
        if frame["type"] == "message.new":
            seq = frame["payload"]["seq"]
            assert not seen or seq == seen[-1] + 1, f"got seq {seq} after {seen[-1:]}"
            seen.append(seq)


async def test_a_user_on_b_receives_what_is_sent_through_a(a: Api, b: Api) -> None:
    alice, bob = await a.users(2)
    device = await Device.connect(b, bob)
    await device.handshake()
    sent = await a.send(alice, [bob], "across instances")
    payload = await device.expect("message.new")
    assert payload["id"] == sent["id"] and payload["seq"] == 1


async def test_one_device_on_each_instance_gets_it_once_each(a: Api, b: Api) -> None:
    alice, bob = await a.users(2)
    on_a, on_b = await Device.connect(a, bob), await Device.connect(b, bob)
    await on_a.handshake()
    await on_b.handshake()
    for i in range(5):
        await (a if i % 2 else b).send(alice, [bob], f"m{i}")
    for device in (on_a, on_b):
        seqs: list[int] = []
        await collect(device, 5, seqs)
        assert seqs == [1, 2, 3, 4, 5]
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # and nothing more came: no duplicate


async def test_read_sync_and_presence_cross_instances(a: Api, b: Api) -> None:
    alice, bob = await a.users(2)
    on_a, on_b = await Device.connect(a, bob), await Device.connect(b, bob)
    await on_a.handshake()
    await on_b.handshake()
    sent = await a.send(alice, [bob])
    for device in (on_a, on_b):
        await device.expect("message.new")
    await on_b.ws.send_json({"type": "read", "payload": {"ids": [sent["id"]]}})
    for device in (on_a, on_b):
        assert await device.expect("message.read") == {"ids": [sent["id"]], "count": 0}
    for api in (a, b):
        async def status(api: Api = api) -> Any:
            return await api.call("GET", f"/users/{bob.id}/presence", user=alice, expect=200)
        for _ in range(200):
            if (await status())["devices"] == 2:
                break
        assert (await status()) | {"last_seen": None} == {"online": True, "devices": 2, "last_seen": None}


async def test_resume_with_since_replays_exactly_what_was_missed(a: Api, b: Api) -> None:
    alice, bob = await a.users(2)
    device = await Device.connect(a, bob)
    await device.handshake()
    for i in range(3):
        await a.send(alice, [bob], f"seen {i}")
    seen: list[int] = []
    await collect(device, 3, seen)
    await device.ws.close()
    for i in range(4):
        await b.send(alice, [bob], f"missed {i}")
    again = await Device.connect(b, bob, params={"token": bob.token, "since": "3"})
    resumed = await again.resume()
    assert [m["seq"] for m in resumed["messages"]] == [4, 5, 6, 7]
    assert [m["content"] for m in resumed["messages"]] == [f"missed {i}" for i in range(4)]
    assert resumed["synced"] == {"seq": 7, "count": 7}
    await a.send(alice, [bob], "live")
    assert (await again.expect("message.new"))["seq"] == 8
    future = await Device.connect(b, bob, params={"token": bob.token, "since": "999"})
    assert (await future.resume())["synced"]["seq"] == 8  # a cursor from the future is clamped, not trusted


async def _kill_pubsub(request: pytest.FixtureRequest, setup: dict[str, Any]) -> int:
    if setup.get("cluster"):
        return int(await asyncio.to_thread(request.getfixturevalue("redis_cluster").kill_pubsub))
    killer = aioredis.Redis.from_url(setup["url"])
    try:
        return int(await killer.client_kill_filter(_type="pubsub"))
    finally:
        await killer.aclose()


async def test_client_kill_of_the_pubsub_connection_loses_nothing(a: Api, b: Api, request: pytest.FixtureRequest,
                                                                  redis_setup: dict[str, Any]) -> None:
    alice, bob = await a.users(2)
    on_a, on_b = await Device.connect(a, bob), await Device.connect(b, bob)
    await on_a.handshake()
    await on_b.handshake()
    total = 40
    for i in range(total):
        await a.send(alice, [bob], f"m{i}")
        if i in (10, 25):
            brokers = [api.client.app[push_hub_key].broker for api in (a, b)]
            await asyncio.wait_for(asyncio.gather(*(br.connected.wait() for br in brokers)), 10)
            killed = await _kill_pubsub(request, redis_setup)
            assert killed >= 2  # both instances' readers, while messages keep flowing
    for device in (on_a, on_b):
        seqs: list[int] = []
        await collect(device, total, seqs)
        assert seqs == list(range(1, total + 1))
    for api in (a, b):
        assert api.client.app[push_hub_key].broker.reconnects >= 1


async def test_concurrent_senders_and_resuming_clients_end_with_the_full_sequence(a: Api, b: Api) -> None:
    senders = await a.users(8)
    recipients = await a.users(3)
    per_sender = 12
    total = 8 * per_sender
    rng = random.Random(20261128)

    async def send_all(sender: User, api: Api) -> None:
        for i in range(per_sender):
            await api.send(sender, recipients, f"{sender.id}:{i}")

    async def device_life(user: User) -> list[int]:
        seqs: list[int] = []
        api = a
        device = await Device.connect(api, user, params={"token": user.token, "since": "0"})
        while True:
            frame = await device.next(timeout=15)
            if frame["type"] == "message.new":
                seq = frame["payload"]["seq"]
                assert not seqs or seq == seqs[-1] + 1, f"{user.id}: seq {seq} after {seqs[-1:]}"
                seqs.append(seq)
                if seq == total:
                    return seqs
                if rng.random() < 0.08:  # drop and resume somewhere else
                    await device.ws.close()
                    api = b if api is a else a
                    device = await Device.connect(api, user, params={"token": user.token, "since": str(seqs[-1])})

    lives = [asyncio.create_task(device_life(u)) for u in recipients]
    await asyncio.gather(*(send_all(s, a if i % 2 else b) for i, s in enumerate(senders)))
    results = await asyncio.wait_for(asyncio.gather(*lives), 60)
    for seqs in results:
        assert seqs == list(range(1, total + 1))


async def test_connection_maps_drain_on_both_instances(a: Api, b: Api) -> None:
    bob = await a.user()
    devices = [await Device.connect(api, bob) for api in (a, b, a)]
    for device in devices:
        await device.handshake()
    for device in devices:
        await device.ws.close()
    for api in (a, b):
        await until(lambda api=api: not api.client.app[ws_users])


async def test_an_instance_subscribes_on_first_connection_and_unsubscribes_on_last(a: Api, redis_setup: dict[str, Any]) -> None:
    bob = await a.user()
    broker = a.client.app[push_hub_key].broker
    channel = broker.channel(bob.id)
    cluster = redis_setup.get("cluster", False)
    probe = (RedisCluster if cluster else aioredis.Redis).from_url(redis_setup["url"])

    async def subscribers() -> int:
        if cluster:  # a shard channel: counted by the master that owns its slot
            node = (await probe.initialize()).get_node_from_key(channel)
            return int(dict(await probe.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node))[channel.encode()])
        return int(dict(await probe.pubsub_numsub(channel))[channel.encode()])

    try:
        assert await subscribers() == 0
        first, second = await Device.connect(a, bob), await Device.connect(a, bob)
        await first.handshake()
        await second.handshake()
        assert await subscribers() == 1  # one pub/sub connection per instance, not per socket
        await first.ws.close()
        await until(lambda: len(a.client.app[ws_users].get(bob.id, ())) == 1)
        assert await subscribers() == 1
        await second.ws.close()
        for _ in range(500):
            if await subscribers() == 0:
                break
        assert await subscribers() == 0
    finally:
        await probe.aclose()


async def test_closing_the_broker_publishes_its_whole_outbox_first(redis_url: str) -> None:
    """Shutdown hands the broker frames faster than Redis takes them; closing it must send
    every one (another instance's devices are waiting for them live), not cancel the rest."""
    from meeting.broker import RedisBroker

    prefix = f"t{uuid.uuid4().hex[:10]}"

    async def no_resync(user_ids: list[int] | None) -> int:
        return 0

    broker = RedisBroker(redis_url, prefix, 2.0, lambda *_: None, no_resync, lambda _: False)
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(broker.channel(7))
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await broker.start()
        for batch in range(5):
            await broker.publish([(7, batch * 1000 + i + 1, "x" * 200) for i in range(1000)], 0.0)
        await broker.close(flush=30)
        seqs: list[int] = []
        while len(seqs) < 5000:
            message = await asyncio.wait_for(pubsub.get_message(ignore_subscribe_messages=True, timeout=5), 10)
            assert message is not None, f"only {len(seqs)} of 5000 frames were published"
            seqs.append(int(message["data"].split(b" ", 2)[1]))  # "<origin> <seq> <committed_at> <frame>"
        assert seqs == list(range(1, 5001))
    finally:
        await pubsub.aclose()
        await listener.aclose()
