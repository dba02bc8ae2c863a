"""Rate limits through the real interface: 429 + Retry-After on REST and before a
WebSocket upgrade, an error frame then 1008 on a room socket, shared through Redis."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from meeting.config import Config, ConfigError, build_config, with_overrides
from tests.helpers import Api, Device, User


def limited(config: Config, **rules: Any) -> Config:
    return with_overrides(config, limits={"enabled": True, **rules})


async def _refused(resp: aiohttp.ClientResponse, rule: str) -> None:
    body = await resp.json()
    assert resp.status == 429 and body["error"]["code"] == "rate_limited", body
    assert body["error"]["details"] == {"limit": rule.replace("_", " ")}
    assert 1 <= int(resp.headers["Retry-After"]) <= 3600


async def test_registrations_per_address(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, registrations_per_address="3/hour")))
    await api.users(3)
    resp = await api.client.post("/auth/register", json={"username": "fourth", "password": "correct horse"})
    await _refused(resp, "registrations_per_address")


async def test_failed_logins_lock_that_username_only_even_for_the_right_password(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, login_failures_per_username="3/15 minutes")))
    victim, other = await api.user("victim"), await api.user("other")
    for _ in range(3):
        await api.call("POST", "/auth/login", json={"username": "Victim", "password": "guess-guess"}, expect=401)
    resp = await api.client.post("/auth/login", json={"username": "victim", "password": "correct horse"})
    await _refused(resp, "login_failures_per_username")
    await api.call("POST", "/auth/login", json={"username": other.username, "password": "correct horse"}, expect=200)
    assert victim.id != other.id


async def test_logins_per_address(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, logins_per_address="4/minute")))
    user = await api.user()  # one login
    for _ in range(3):
        await api.call("POST", "/auth/login", json={"username": user.username, "password": "correct horse"}, expect=200)
    await _refused(await api.client.post("/auth/login", json={"username": user.username, "password": "correct horse"}),
                   "logins_per_address")


async def test_sends_per_user_count_messages_and_meetings(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, sends_per_user="3/minute")))
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    await api.send(alice, [bob])
    await api.call("POST", "/meetings", user=alice, json={"title": "t", "participant_ids": [bob.id]}, expect=201)
    await _refused(await api.client.post("/messages", json={"recipient_ids": [bob.id], "content": "x"}, headers=alice.headers),
                   "sends_per_user")
    await api.send(bob, [alice])  # another user's own allowance
    assert await api.unread_count(bob) == 3  # two messages and one invitation: nothing of the refused one


async def _connect(api: Api, path: str, user: User) -> aiohttp.ClientWebSocketResponse:
    return await api.client.ws_connect(path, params={"token": user.token})


async def test_websocket_connects_per_user_get_429_before_the_upgrade(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, connects_per_user="2/minute")))
    bob, carol = await api.users(2)
    meeting = await api.call("POST", "/meetings", user=bob, json={"title": "t", "participant_ids": []}, expect=201)
    first = Device(await _connect(api, "/ws/messages", bob))
    await first.handshake()
    await _connect(api, f"/ws/meetings/{meeting['id']}", bob)  # both kinds count
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await _connect(api, "/ws/messages", bob)
    assert refused.value.status == 429
    Device(await _connect(api, "/ws/messages", carol))  # someone else connects as usual


async def test_websocket_connects_per_address(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, connects_per_address="2/minute")))
    users = await api.users(3)
    for user in users[:2]:
        await _connect(api, "/ws/messages", user)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await _connect(api, "/ws/messages", users[2])
    assert refused.value.status == 429


async def test_room_chat_over_the_limit_gets_error_frames_then_1008_and_the_room_goes_on(make_client: Any, config: Config) -> None:
    api = Api(await make_client(limited(config, chat_per_connection="2/minute", strikes=3)))
    org, bob = await api.users(2)
    meeting = await api.call("POST", "/meetings", user=org, json={"title": "t", "participant_ids": [bob.id]}, expect=201)
    listener = Device(await _connect(api, f"/ws/meetings/{meeting['id']}", org))
    talker = Device(await _connect(api, f"/ws/meetings/{meeting['id']}", bob))
    assert await listener.expect("meeting.joined") == {"user_id": bob.id}
    for i in range(5):
        await talker.ws.send_json({"type": "meeting.chat", "payload": {"text": f"t{i}"}})
    assert [(await talker.next())["type"] for _ in range(5)] == ["meeting.chat", "meeting.chat", "error", "error", "error"]
    assert talker.frames[2]["payload"]["code"] == "rate_limited"
    assert await talker.closed() == 1008
    assert [await listener.expect("meeting.chat") for _ in range(2)] == [{"user_id": bob.id, "text": "t0"}, {"user_id": bob.id, "text": "t1"}]
    assert await listener.expect("meeting.left") == {"user_id": bob.id}


async def test_limits_hold_across_instances_through_redis(make_client: Any, config: Config, redis_url: str) -> None:
    # A generous Redis timeout: on a loaded box a slow reply would open the breaker, and the
    # counts would (rightly) fall back to each process, which is not what this test is about.
    shared = limited(with_overrides(config, redis={"url": redis_url, "prefix": f"t{id(config)}", "socket_timeout": 3.0}),
                     sends_per_user="3/minute")
    a, b = Api(await make_client(shared)), Api(await make_client(shared))
    alice, bob = await a.users(2)
    await a.send(alice, [bob])
    await b.send(alice, [bob])
    await a.send(alice, [bob])
    await _refused(await b.client.post("/messages", json={"recipient_ids": [bob.id], "content": "x"}, headers=alice.headers),
                   "sends_per_user")


async def test_with_redis_down_limits_still_hold_in_the_process(make_client: Any, config: Config) -> None:
    down = limited(with_overrides(config, redis={"url": "redis://127.0.0.1:1/0", "socket_timeout": 0.2}), sends_per_user="2/minute")
    api = Api(await make_client(down))
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    await api.send(alice, [bob])
    await _refused(await api.client.post("/messages", json={"recipient_ids": [bob.id], "content": "x"}, headers=alice.headers),
                   "sends_per_user")


async def test_forwarded_addresses_count_only_from_trusted_proxies(make_client: Any, config: Config) -> None:
    for trusted, separate in (("127.0.0.1/32,::1/128", True), ("", False)):
        api = Api(await make_client(limited(config, registrations_per_address="1/hour", trusted_proxies=trusted)))
        statuses = []
        for i, client_ip in enumerate(["203.0.113.7", "198.51.100.9"]):
            resp = await api.client.post("/auth/register", json={"username": f"fw{i}{int(separate)}", "password": "correct horse"},
                                         headers={"X-Forwarded-For": f"10.9.9.9, {client_ip}"})
            statuses.append(resp.status)
        # trusted: two client addresses, one registration each; untrusted: one peer, the second is refused
        assert statuses == ([201, 201] if separate else [201, 429])


def test_rates_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"limits\.sends_per_user"):
        build_config({"limits": {"sends_per_user": "lots"}}, environ={})
    assert build_config({}, environ={"MEETING_LIMITS_ENABLED": "false"}).limits.enabled is False


@pytest.mark.parametrize("path", ["/ws/messages", "/ws/meetings/{meeting}"])
async def test_origin_allowlist_refuses_other_browser_origins_with_403(make_client: Any, config: Config, path: str) -> None:
    api = Api(await make_client(with_overrides(config, push={"allowed_origins": "https://app.example.com"})))
    bob = await api.user()
    meeting = await api.call("POST", "/meetings", user=bob, json={"title": "t", "participant_ids": []}, expect=201)
    url = path.format(meeting=meeting["id"])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.client.ws_connect(url, params={"token": bob.token}, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    resp = await api.client.get(url, params={"token": bob.token}, headers={"Origin": "https://evil.example"})
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    await api.client.ws_connect(url, params={"token": bob.token}, headers={"Origin": "https://app.example.com"})
    await api.client.ws_connect(url, params={"token": bob.token}, headers={"Origin": "https://APP.Example.com:443"})
    await api.client.ws_connect(url, params={"token": bob.token})  # no Origin: not a browser


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
async def test_the_cluster_storage_keeps_the_urls_tls(scheme: str) -> None:
    """`limits` takes the cluster as async+redis+cluster://host:port; a rediss:// seed must still
    mean TLS to every node. (No TLS cluster here: this checks the client the library was given.)"""
    from redis.asyncio.connection import Connection, SSLConnection

    from meeting.breaker import RedisBreaker
    from meeting.config import LimitsConfig, RedisConfig
    from meeting.ratelimit import RateLimits
    from meeting.redis_client import connect

    url = f"{scheme}://127.0.0.1:1"
    client = connect(url, True, 0.2)  # never connects: construction only
    limits = RateLimits(LimitsConfig(), RedisBreaker(client, 30.0, 0.2), RedisConfig(url=url, cluster=True))
    storage = limits._cluster_storage.bridge.storage  # type: ignore[union-attr]
    wanted = SSLConnection if scheme == "rediss" else Connection
    assert storage.nodes_manager.connection_kwargs["connection_class"] is wanted
    assert client.nodes_manager.connection_kwargs.get("connection_class", Connection) is wanted  # as the shared client
