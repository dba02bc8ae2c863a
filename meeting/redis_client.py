"""The shared redis.asyncio client (redis-py; aioredis is dead and breaks on 3.11).

Redis is optional: with no `redis.url` the app runs without it. When it is
configured the client is created lazily-connecting, so a Redis that is down at
start-up degrades the features that use it instead of refusing to start. Beside
the client lives the process's one circuit breaker (meeting.breaker), shared by
the cache, presence and the brokers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .breaker import RedisBreaker
from .typedefs import config_key, redis_breaker_key, redis_key

log = logging.getLogger(__name__)


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[config_key].redis
    client: aioredis.Redis | None = None
    if cfg.url:
        client = aioredis.Redis.from_url(
            cfg.url,
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.socket_timeout,
            health_check_interval=30,
            # One immediate retry of a pooled connection gone stale (a connection error),
            # never of a timeout: a hung Redis must cost one socket_timeout, not two,
            # before the breaker opens and callers use the database.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
    app[redis_key] = client
    breaker = RedisBreaker(client, cfg.error_log_interval, max(cfg.socket_timeout, 1.0))
    app[redis_breaker_key] = breaker
    yield
    await breaker.close()
    if client is not None:
        await client.aclose()


async def ping(client: aioredis.Redis, timeout: float) -> None:
    await asyncio.wait_for(client.ping(), timeout)
