"""The shared redis.asyncio client (redis-py; aioredis is dead and breaks on 3.11).

Redis is optional: with no `redis.url` the app runs without it. When it is
configured the client is created lazily-connecting, so a Redis that is down at
start-up degrades the features that use it instead of refusing to start.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .typedefs import config_key, redis_key

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
            # One immediate retry (a pooled connection gone stale), never seconds of
            # backoff: callers fall back to the database instead of waiting.
            retry=Retry(NoBackoff(), 1),
        )
    app[redis_key] = client
    yield
    if client is not None:
        await client.aclose()


async def ping(client: aioredis.Redis, timeout: float) -> None:
    await asyncio.wait_for(client.ping(), timeout)
