"""The unread/inbox cache against a real Redis: used, never stale, never fatal."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis

from meeting.breaker import RedisBreaker
from meeting.cache import MessageCache
from meeting.config import Config, RedisConfig, with_overrides
from meeting.typedefs import cache_key
from tests.helpers import Api


@pytest.fixture
def config(config: Config, redis_url: str) -> Config:
    return with_overrides(config, redis={"url": redis_url, "prefix": f"t{uuid.uuid4().hex[:10]}", "socket_timeout": 0.2})


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_reads_are_served_from_redis_and_sends_invalidate(api: Api) -> None:
    cache = api.client.app[cache_key]
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    assert await api.unread_count(bob) == 1
    hits = cache.hits
    assert await api.unread_count(bob) == 1
    await api.call("GET", "/messages", user=bob)
    await api.call("GET", "/messages", user=bob)
    assert cache.hits >= hits + 2
    await api.send(alice, [bob])
    assert await api.unread_count(bob) == 2
    assert len((await api.call("GET", "/messages", user=bob))["messages"]) == 2


def _cache(client: aioredis.Redis, prefix: str) -> MessageCache:
    return MessageCache(RedisBreaker(client, log_interval=30.0, probe_timeout=0.2),
                        RedisConfig(url="redis://unused", prefix=prefix, socket_timeout=0.2, cache_ttl=60))


async def test_a_value_computed_before_an_invalidation_is_not_cached(raw_redis: aioredis.Redis) -> None:
    cache = _cache(raw_redis, f"t{uuid.uuid4().hex[:10]}")
    truth = {"count": 1}

    async def slow_stale_read() -> int:
        value = truth["count"]        # read from the "database" before the writer commits
        truth["count"] = 2            # the writer commits ...
        await cache.invalidate([7])   # ... and invalidates while the reader is still busy
        return value

    assert await cache.get("unread", 7, slow_stale_read, str, int) == 1  # the reader's own answer
    assert await cache.get("unread", 7, _const(truth), str, int) == 2     # but it was not cached
    assert await cache.get("unread", 7, _const({"count": 99}), str, int) == 2  # now it is


def _const(box: dict[str, int]) -> Any:
    async def read() -> int:
        return box["count"]
    return read


async def test_lost_invalidation_flushes_the_cache_before_it_is_trusted_again(raw_redis: aioredis.Redis, redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
    cache = _cache(client, prefix)
    try:
        assert await cache.get("unread", 5, _const({"count": 1}), str, int) == 1
        await raw_redis.execute_command("CLIENT", "PAUSE", "700", "WRITE")
        await cache.invalidate([5])          # times out: the invalidation is lost
        assert cache.errors >= 1
        await raw_redis.execute_command("CLIENT", "UNPAUSE")
        await asyncio.wait_for(_until_available(cache), 5)
        # The stale entry (1) must not be served: the epoch was replaced.
        assert await cache.get("unread", 5, _const({"count": 3}), str, int) == 3
    finally:
        await raw_redis.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()


async def _until_available(cache: MessageCache) -> None:
    while not cache.available:  # the breaker's probe closes it once Redis answers
        await asyncio.sleep(0.05)


async def test_a_hung_redis_costs_bounded_time_and_logs_once(api: Api, raw_redis: aioredis.Redis, caplog: Any) -> None:
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    await raw_redis.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    try:
        started = time.monotonic()
        for _ in range(5):
            assert await api.unread_count(bob) == 1
        await api.send(alice, [bob])
        assert await api.unread_count(bob) == 2
        assert time.monotonic() - started < 2.5  # one 0.2 s timeout, then the breaker, not 7 timeouts
    finally:
        await raw_redis.execute_command("CLIENT", "UNPAUSE")
    warnings = [r for r in caplog.records if "redis unavailable (the message cache" in r.getMessage()]
    assert len(warnings) == 1
    assert api.client.app[cache_key].errors >= 1
    assert await api.unread_count(bob) == 2


async def test_an_epoch_and_invalidation_lost_in_a_failover_serve_nothing_stale(raw_redis: aioredis.Redis) -> None:
    """Replication is asynchronous: a failover can bring back an older epoch, gen and entry
    together, under which the old entry matches its stamp again. An instance that saw a higher
    epoch treats the lower one as a lost bump: it bumps past both and serves from the database."""
    from meeting.redis_client import key

    prefix = f"t{uuid.uuid4().hex[:10]}"
    here, there = _cache(raw_redis, prefix), _cache(raw_redis, prefix)
    names = [f"{prefix}:cache:epoch", key(prefix, 5, "cache", "gen"), key(prefix, 5, "cache", "unread")]
    assert await here.get("unread", 5, _const({"count": 1}), str, int) == 1
    replica = [await raw_redis.get(name) for name in names]  # what a replica still holds after the failover
    await there.suspect()       # a bump (the other instance saw Redis trouble) ...
    await there.invalidate([5])  # ... and a send to user 5, both acknowledged by the master only
    assert await here.get("unread", 5, _const({"count": 2}), str, int) == 2
    seen = here.epoch
    assert seen > 0
    for name, value in zip(names, replica):  # the master dies; its replica takes over
        await (raw_redis.set(name, value) if value is not None else raw_redis.delete(name))
    assert await here.get("unread", 5, _const({"count": 2}), str, int) == 2  # not the stale 1
    assert int(await raw_redis.get(names[0])) > seen and here.epoch > seen
    assert await there.get("unread", 5, _const({"count": 2}), str, int) == 2
    assert await here.get("unread", 5, _const({"count": 99}), str, int) == 2  # cached again, under the new epoch
