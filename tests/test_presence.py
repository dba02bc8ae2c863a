"""Presence from real connections, with Redis off, on, and configured but down."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from meeting.config import Config, with_overrides
from meeting.redis_client import key
from meeting.typedefs import presence_key, redis_key, ws_users
from tests.conftest import base_config
from tests.helpers import Api, Device
from tests.test_ws import until


@pytest.fixture
def config(config: Config, redis_mode: dict[str, Any]) -> Config:
    return with_overrides(config, redis=redis_mode)


async def test_presence_follows_devices(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    never = await api.call("GET", f"/users/{carol.id}/presence", user=alice, expect=200)
    assert never == {"online": False, "last_seen": None, "devices": 0}
    phone, laptop = await Device.connect(api, bob), await Device.connect(api, bob)
    await phone.handshake()
    await laptop.handshake()

    async def status() -> dict[str, Any]:
        return await api.call("GET", f"/users/{bob.id}/presence", user=alice, expect=200)

    await _eventually(status, lambda s: s["devices"] == 2)
    online = await status()
    assert online["online"] is True and dt.datetime.fromisoformat(online["last_seen"]).utcoffset() == dt.timedelta(0)
    many = await api.call("GET", "/presence", user=alice, params={"ids": f"{bob.id},{carol.id},{bob.id}"}, expect=200)
    assert many["users"][str(bob.id)]["devices"] == 2 and many["users"][str(carol.id)]["online"] is False
    await phone.ws.close()
    await laptop.ws.close()
    await until(lambda: bob.id not in api.client.app[ws_users])
    await _eventually(status, lambda s: s["devices"] == 0)
    offline = await status()
    assert offline["online"] is False and offline["last_seen"] is not None


async def _eventually(fetch: Any, ok: Any, attempts: int = 200) -> None:
    """Presence updates are fire-and-forget after connect/disconnect: poll the API for them."""
    for _ in range(attempts):
        if ok(await fetch()):
            return
    raise AssertionError(f"presence never became as expected: {await fetch()}")


async def test_presence_validation_and_unknown_user(api: Api) -> None:
    alice = await api.user()
    await api.call("GET", "/users/999999/presence", user=alice, expect=404)
    for bad in ("", "a,b", ",".join(["1"] * 101), "1,,2"):
        await api.call("GET", "/presence", user=alice, params={"ids": bad}, expect=422)
    await api.call("GET", "/presence", user=alice, expect=422)


async def test_presence_is_kept_in_the_redis_hashes(make_client: Any, db_url: str, redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    api = Api(await make_client(base_config(database={"url": db_url}, redis={"url": redis_url, "prefix": prefix})))
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    client = api.client.app[redis_key]
    assert client is not None

    async def devices() -> int:
        return int(await client.zcard(key(prefix, bob.id, "devices")))  # `{u<id>}`: one shard per user in a cluster

    await _eventually(devices, lambda n: n == 1)
    assert await client.hget(f"{prefix}:online_users", str(bob.id)) is not None


async def test_a_shared_admission_that_fails_closes_its_connects_cleanly(make_client: Any, db_url: str, redis_url: str) -> None:
    """An admission call failing with something other than a Redis error (a broken script)
    ends each of its connects with 1011 and leaves nothing of them counted; the next
    connect, with the script back, is admitted."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    api = Api(await make_client(base_config(database={"url": db_url}, redis={"url": redis_url, "prefix": prefix})))
    bob, carol = await api.users(2)
    presence = api.client.app[presence_key]
    working = presence._admit_many

    async def broken(**_: Any) -> Any:
        raise ValueError("the admission script is broken")

    presence._admit_many = broken
    devices = [await Device.connect(api, user) for user in (bob, bob, carol)]
    assert [await device.closed() for device in devices] == [1011, 1011, 1011]
    assert presence._local == {} and api.client.app[ws_users] == {}
    presence._admit_many = working
    device = await Device.connect(api, bob)
    await device.handshake()
    assert presence._local == {bob.id: {next(iter(api.client.app[ws_users][bob.id])).id}}
