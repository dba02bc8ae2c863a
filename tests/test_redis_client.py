"""meeting.redis_client: the client every Redis user of an instance shares."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from meeting.breaker import RedisBreaker
from meeting.typedefs import redis_breaker_key, redis_key
from tests.conftest import base_config
from tests.helpers import Api


async def test_more_calls_in_flight_than_redis_pys_default_pool_do_not_open_the_breaker(
        make_client: Any, db_url: str, redis_url: str) -> None:
    """redis-py's asyncio pool holds 100 connections unless told otherwise and fails the 101st
    call at once: a connect storm's concurrent calls opened the breaker. `redis.max_connections`
    is the pool's size; with 150 calls in flight at once every one is answered."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    api = Api(await make_client(base_config(database={"url": db_url},
                                            redis={"url": redis_url, "prefix": prefix, "max_connections": 200})))
    client = api.client.app[redis_key]
    breaker: RedisBreaker = api.client.app[redis_breaker_key]
    assert client is not None
    assert client.connection_pool.max_connections == 200
    # All 150 are sent before the first answer: each holds its connection meanwhile.
    answers = await asyncio.gather(*(client.eval("return ARGV[1]", 0, str(i)) for i in range(150)))
    assert [int(a) for a in answers] == list(range(150))
    assert breaker.available
