"""meeting.redis_client: the client every Redis user of an instance shares."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from meeting.typedefs import redis_key
from tests.conftest import base_config
from tests.helpers import Api


async def test_more_calls_in_flight_than_redis_pys_default_pool_are_all_answered(
        make_client: Any, db_url: str, redis_url: str) -> None:
    """redis-py's asyncio pool holds 100 connections unless told otherwise and fails the 101st
    call at once (MaxConnectionsError), which in a connect storm opened the breaker.
    `redis.max_connections` is the pool's size; with 150 calls in flight at once every one is
    answered."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    api = Api(await make_client(base_config(database={"url": db_url},
                                            redis={"url": redis_url, "prefix": prefix, "max_connections": 200,
                                                   # 150 connects at once on a busy host: this is about
                                                   # the pool's size, not about a slow connect
                                                   "socket_timeout": 5.0})))
    client = api.client.app[redis_key]
    assert client is not None
    assert client.connection_pool.max_connections == 200
    # All 150 are sent before the first answer: each holds its connection meanwhile.
    answers = await asyncio.gather(*(client.eval("return ARGV[1]", 0, str(i)) for i in range(150)))
    assert [int(a) for a in answers] == list(range(150))
