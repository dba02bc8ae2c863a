"""The shared redis.asyncio client (redis-py; aioredis is dead and breaks on 3.11).

Redis is optional: with no `redis.url` the app runs without it. When it is
configured the client is created lazily-connecting, so a Redis that is down at
start-up degrades the features that use it instead of refusing to start. Beside
the client lives the process's one circuit breaker (meeting.breaker), shared by
the cache, presence and the brokers.

With `redis.cluster` the client is redis-py's asyncio `RedisCluster`, seeded with
`redis.url`: it learns the topology on its first command and again after a
MOVED or a connection error (a failover). Every multi-key command or script of
the cache, presence and rate limits touches the keys of one user, which share a
hash tag (`key()`), so each runs on one shard.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Union

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .breaker import RedisBreaker
from .typedefs import config_key, redis_breaker_key, redis_key

log = logging.getLogger(__name__)

#: A standalone Redis or a cluster: both take the same commands for one user's keys.
Client = Union[aioredis.Redis, RedisCluster]


def key(prefix: str, user_id: int, *parts: object) -> str:
    """`<prefix>:{u<id>}:<parts>`: every key of one user has the same hash tag, so a
    script or a multi-key command over them stays on one cluster shard."""
    return ":".join([prefix, f"{{u{user_id}}}", *map(str, parts)])


def connect(url: str, cluster: bool, socket_timeout: float) -> Client:
    # One immediate retry of a pooled connection gone stale (a connection error),
    # never of a timeout: a hung Redis must cost one socket_timeout, not two,
    # before the breaker opens and callers use the database. (In a cluster the
    # retry follows a topology refresh: the shard may have failed over.)
    options = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, health_check_interval=30,
                   retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    if cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[config_key].redis
    client = connect(cfg.url, cfg.cluster, cfg.socket_timeout) if cfg.url else None
    app[redis_key] = client
    breaker = RedisBreaker(client, cfg.error_log_interval, max(cfg.socket_timeout, 1.0))
    app[redis_breaker_key] = breaker
    yield
    await breaker.close()
    if client is not None:
        await client.aclose()


async def ping(client: Client, timeout: float) -> None:
    await asyncio.wait_for(client.ping(), timeout)
