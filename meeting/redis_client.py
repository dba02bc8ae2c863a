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


def no_cluster_retry() -> Retry:
    """For every RedisCluster we create: no retry at all. redis-py's cluster (8.x) takes only the
    count from its `retry` and retries a TimeoutError too, whatever `supported_errors` says (a GET
    on a frozen master cost two socket timeouts), and its pipeline retry closes the whole shared
    client. A timed-out script may also have run: retried, a rate-limit hit would count twice.
    The price: the first command on a connection a failover made stale fails (the breaker opens
    until its probe gets an answer, about a second) instead of being retried."""
    return Retry(NoBackoff(), 0)


def connect(url: str, cluster: bool, socket_timeout: float, max_connections: int = 1000) -> Client:
    # One immediate retry of a pooled connection gone stale (a connection error),
    # never of a timeout: a hung Redis must cost one socket_timeout, not two,
    # before the breaker opens and callers use the database. `max_connections`: redis-py's
    # asyncio pool allows 100 unless told otherwise and then fails a call at once
    # (MaxConnectionsError), which a connect storm's concurrent cache and presence calls reached:
    # the breaker opened and the whole process fell back to the database.
    options = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, health_check_interval=30,
                   max_connections=max_connections)
    if cluster:
        return RedisCluster.from_url(url, retry=no_cluster_retry(), **options)
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), **options)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[config_key].redis
    client = connect(cfg.url, cfg.cluster, cfg.socket_timeout, cfg.max_connections) if cfg.url else None
    app[redis_key] = client
    breaker = RedisBreaker(client, cfg.error_log_interval, max(cfg.socket_timeout, 1.0))
    app[redis_breaker_key] = breaker
    yield
    await breaker.close()
    if client is not None:
        await client.aclose()


async def ping(client: Client, timeout: float) -> None:
    await asyncio.wait_for(client.ping(), timeout)
