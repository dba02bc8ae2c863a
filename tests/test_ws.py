"""Real-time push on /ws/messages, named after the seed plan's acceptance list (1-8), then the rest."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import socket
import uuid
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from meeting.auth import TokenCodec
from meeting.config import Config, with_overrides
from meeting.typedefs import message_service_key, push_hub_key, rooms_key, stats_key, ws_users
from meeting.ws import UserConnection
from meeting.web import create_app
from tests.conftest import TEST_SECRET
from tests.helpers import Api, Device, Held, User, session_of, until

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture(params=["redis-off", "redis-on"])
def config(config: Config, request: pytest.FixtureRequest) -> Config:
    """Push must behave the same with and without Redis (cache and presence in play)."""
    if request.param == "redis-off":
        return config
    return with_overrides(config, redis={"url": request.getfixturevalue("redis_url"), "prefix": f"t{uuid.uuid4().hex[:10]}"})


def connections(api: Api) -> dict[int, set[UserConnection]]:
    return api.client.app[ws_users]


# 1. a valid token connects, an invalid or expired one is refused with 401

@pytest.mark.parametrize("how", ["query", "header", "subprotocol"])
async def test_1_valid_token_connects_in_each_way(api: Api, how: str) -> None:
    bob = await api.user()
    kwargs: dict[str, Any] = {"query": {}, "header": {"params": {}, "headers": {"Authorization": f"Bearer {bob.token}"}},
                              "subprotocol": {"params": {}, "protocols": ("bearer", bob.token)}}[how]
    device = await Device.connect(api, bob, **kwargs)
    connected = await device.expect("connected")
    assert connected["user_id"] == bob.id and connected["heartbeat"] == 30.0 and connected["connection_id"]
    if how == "subprotocol":
        assert device.ws.protocol == "bearer"
    assert bob.id in connections(api)


@pytest.mark.parametrize("token", ["missing", "garbage", "expired", "wrong-key", "alg-none"])
async def test_1_bad_tokens_get_401_json_before_upgrade(api: Api, token: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    value = {
        "missing": None, "garbage": "x.y.z",
        "expired": jwt.encode({"sub": "1", "sid": 1, "iss": "meeting", "aud": "meeting", "iat": now - dt.timedelta(hours=2),
                               "exp": now - dt.timedelta(hours=1)}, TEST_SECRET, algorithm="HS256"),
        "wrong-key": jwt.encode({"sub": "1", "iat": now, "exp": now + dt.timedelta(hours=1)}, "k" * 40, algorithm="HS256"),
        "alg-none": jwt.encode({"sub": "1", "iat": 1, "exp": 4102444800}, None, algorithm="none"),
    }[token]
    resp = await api.client.get("/ws/messages", params={"token": value} if value else {}, headers=UPGRADE)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == {"missing": "missing_token", "expired": "token_expired"}.get(token, "invalid_token")
    assert connections(api) == {}


# 2. an online recipient receives a new message in real time; 3. every device of a user

async def test_2_3_online_recipients_get_it_on_every_device(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    phone, laptop, other = await Device.connect(api, bob), await Device.connect(api, bob), await Device.connect(api, carol)
    for device in (phone, laptop, other):
        assert (await device.handshake())["messages"] == []
    sent = await api.send(alice, [bob, carol], "实时 ⚡")
    for device in (phone, laptop, other):
        payload = await device.expect("message.new")
        assert payload["id"] == sent["id"] and payload["content"] == "实时 ⚡" and payload["read_at"] is None
        assert "recipient_ids" not in payload and payload["recipient_count"] == 2  # the recipient's view
    assert len(connections(api)[bob.id]) == 2


# 4. an offline user's messages are stored and pullable after login

async def test_4_offline_messages_are_stored_and_pullable(api: Api) -> None:
    alice, bob = await api.users(2)
    ids = [(await api.send(alice, [bob], f"offline {i}"))["id"] for i in range(3)]
    login = await api.call("POST", "/auth/login", json={"username": bob.username, "password": "correct horse"}, expect=200)
    relogged = User(bob.id, bob.username, login["access_token"])
    unread = await api.call("GET", "/messages/unread", user=relogged, expect=200)
    assert [m["id"] for m in unread["messages"]] == ids and unread["count"] == 3


# 5. the meeting WebSocket is unaffected

async def test_5_meeting_room_works_beside_push_and_stays_separate(api: Api) -> None:
    org, bob = await api.users(2)
    meeting = await api.call("POST", "/meetings", user=org, json={"title": "sync", "participant_ids": [bob.id]}, expect=201)
    push = await Device.connect(api, bob)
    backlog = await push.handshake()
    assert [m["type"] for m in backlog["messages"]] == ["meeting.invite"]
    room = await api.client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": bob.token})
    await room.send_json({"type": "meeting.chat", "payload": {"text": "hi"}})
    chat = await asyncio.wait_for(room.receive_json(), 5)
    assert chat["type"] == "meeting.chat"
    await push.ws.send_json({"type": "ping"})
    assert (await push.next())["type"] == "pong"  # the chat never reached the push socket


# 6. a dropped connection (network cut or page refresh) is cleaned up

async def test_6_dropped_connections_are_removed(api: Api) -> None:
    alice, bob = await api.users(2)
    refreshed = await Device.connect(api, bob)
    await refreshed.handshake()
    cut = await Device.connect(api, bob)
    await cut.handshake()
    await refreshed.ws.close()                              # page refresh: a clean close
    cut.ws._response.connection.transport.abort()           # network cut: no close frame at all
    await until(lambda: bob.id not in connections(api))
    await api.send(alice, [bob], "still stored")
    assert await api.unread_count(bob) == 1


# 7. a reconnect gets the unread backlog exactly

async def test_7_reconnect_gets_exactly_the_unread_backlog_oldest_first(api: Api) -> None:
    alice, bob = await api.users(2)
    ids = [(await api.send(alice, [bob], f"m{i}"))["id"] for i in range(6)]
    await api.call("POST", "/messages/read", user=bob, json={"ids": [ids[1], ids[4]]}, expect=200)
    device = await Device.connect(api, bob)
    backlog = await device.handshake()
    assert [m["id"] for m in backlog["messages"]] == [ids[0], ids[2], ids[3], ids[5]]
    assert backlog["count"] == 4 and backlog["has_more"] is False
    await device.ws.close()
    again = await Device.connect(api, bob)
    assert [m["id"] for m in (await again.handshake())["messages"]] == [ids[0], ids[2], ids[3], ids[5]]


async def test_devices_connecting_together_share_one_sync_point_and_each_gets_its_own_backlog(make_client: Any, config: Config) -> None:
    """A connect storm reads its sync points in shared statements: each device still gets
    exactly its user's unread messages up to its seq, and the count of them, then what
    is sent after it exactly once. Three waiting devices are less than a batch: they wait
    for one statement, not one each."""
    api = Api(await make_client(config))
    alice, bob, carol, dave = await api.users(4)
    to_bob = [(await api.send(alice, [bob], f"b{i}"))["id"] for i in range(3)]
    to_both = [(await api.send(alice, [bob, carol], f"c{i}"))["id"] for i in range(2)]
    await api.call("POST", "/messages/read", user=bob, json={"ids": [to_bob[1]]}, expect=200)
    sync_points = api.client.app[message_service_key]._sync_points
    held = sync_points._run = Held(sync_points._run)
    first = await Device.connect(api, dave)
    await asyncio.wait_for(held.started.wait(), 5)  # the others arrive while its statement runs
    together = [await Device.connect(api, user) for user in (bob, bob, carol)]
    await until(lambda: len(sync_points._pending) == 3)
    batches = sync_points.batches
    held.release.set()
    assert await first.handshake() == {"messages": [], "count": 0, "has_more": False, "synced": {"seq": 0, "count": 0}}
    for device in together[:2]:
        backlog = await device.handshake()
        assert [m["id"] for m in backlog["messages"]] == [to_bob[0], to_bob[2], *to_both]
        assert [m["seq"] for m in backlog["messages"]] == [1, 3, 4, 5] and backlog["synced"] == {"seq": 5, "count": 4}
    backlog = await together[2].handshake()
    assert [m["id"] for m in backlog["messages"]] == to_both and backlog["synced"] == {"seq": 2, "count": 2}
    assert sync_points.batches == batches + 1  # the three waiting devices shared one statement
    after = await api.send(alice, [bob, carol], "after the sync")  # live: exactly once on each device, next in seq
    for device, seq in zip(together, (6, 6, 3)):
        assert ((new := await device.expect("message.new"))["id"], new["seq"]) == (after["id"], seq)
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # nothing else came: no duplicate, no stray frame


@pytest.fixture
def small_backlog(config: Config) -> Config:
    return with_overrides(config, push={"backlog_limit": 450})


async def test_a_flood_of_sync_points_runs_whole_batches_side_by_side_each_user_paged_on_its_own(make_client: Any, config: Config) -> None:
    """Batches of 2, at most 2 statements in flight: while the first is held, a whole batch
    waiting starts a second beside it, a third waits. Every statement pages each of its
    users on their own (`backlog_limit` 2: each device gets its user's first 2 unread by
    seq, and the count of all of them up to its seq), on SQLite and MariaDB."""
    api = Api(await make_client(with_overrides(config, push={"sync_point_batch": 2, "sync_point_lanes": 2, "backlog_limit": 2})))
    alice, bob, carol, erin, frank, dave = await api.users(6)
    early = (await api.send(alice, [bob], "early"))["id"]
    shared = [(await api.send(alice, [bob, carol, erin, frank], f"m{i}"))["id"] for i in range(5)]
    await api.call("POST", "/messages/read", user=carol, json={"ids": [shared[1]]}, expect=200)
    sync_points = api.client.app[message_service_key]._sync_points
    held = sync_points._run = Held(sync_points._run)
    batches = sync_points.batches
    first = await Device.connect(api, dave)
    await asyncio.wait_for(held.started.wait(), 5)
    devices = [await Device.connect(api, user) for user in (bob, carol)]
    await until(lambda: sync_points.batches == batches + 2)  # [bob, carol] was whole: a second statement beside the first
    devices += [await Device.connect(api, user) for user in (erin, frank)]
    await until(lambda: len(sync_points._pending) == 2)  # [erin, frank] is whole too, but two are in flight
    assert sync_points.batches == batches + 2 and len(sync_points._tasks) == 2
    held.release.set()
    assert (await first.handshake())["synced"] == {"seq": 0, "count": 0}
    expected = [([early, shared[0]], {"seq": 6, "count": 6}), ([shared[0], shared[2]], {"seq": 5, "count": 4}),
                (shared[:2], {"seq": 5, "count": 5}), (shared[:2], {"seq": 5, "count": 5})]
    for device, (ids, synced) in zip(devices, expected):
        backlog = await device.handshake()
        assert [m["id"] for m in backlog["messages"]] == ids and backlog["synced"] == synced
    assert sync_points.batches == batches + 3


async def test_7_large_backlogs_come_in_frames_of_200_up_to_the_limit(make_client: Any, small_backlog: Config) -> None:
    api = Api(await make_client(small_backlog))
    alice, bob = await api.users(2)
    for i in range(460):
        await api.send(alice, [bob], f"m{i}")
    device = await Device.connect(api, bob)
    await device.expect("connected")
    frames = [await device.expect("message.unread") for _ in range(3)]
    assert (await device.expect("message.synced")) == {"seq": 460, "count": 460}
    assert [len(f["messages"]) for f in frames] == [200, 200, 50]
    assert [f["has_more"] for f in frames] == [False, False, True] and {f["count"] for f in frames} == {460}
    ids = [m["id"] for f in frames for m in f["messages"]]
    assert ids == sorted(ids) and len(set(ids)) == 450
    await device.ws.send_json({"type": "ping"})
    assert (await device.next())["type"] == "pong"  # nothing else was queued


# 8. every frame validates against its schema: Device.next() validates each frame it reads.

async def test_connect_race_delivers_every_message_exactly_once(api: Api) -> None:
    alice, bob = await api.users(2)
    for round_ in range(4):
        async def sender() -> list[int]:
            return [(await api.send(alice, [bob], f"r{round_}-{i}"))["id"] for i in range(15)]
        sending = asyncio.create_task(sender())
        device = await Device.connect(api, bob)
        backlog = await device.handshake()
        sent = await sending
        marker = (await api.send(alice, [bob], "marker"))["id"]
        got = [m["id"] for m in backlog["messages"]]
        while True:
            payload = await device.expect("message.new")
            got.append(payload["id"])
            if payload["id"] == marker:
                break
        assert len(got) == len(set(got)), "a message arrived twice"
        assert set(sent) <= set(got), "a message fell in the gap"
        await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
        # Wait for that read's frame here: with Redis it is published after the answer, and
        # must not reach the next round's device (which would get it, harmlessly, after its
        # message.synced: a read of messages it never had).
        assert sorted((await device.expect("message.read"))["ids"]) == sorted(got)
        await device.ws.close()


async def test_read_sync_across_devices_from_ws_and_rest(api: Api) -> None:
    alice, bob = await api.users(2)
    phone, laptop = await Device.connect(api, bob), await Device.connect(api, bob)
    await phone.handshake()
    await laptop.handshake()
    first, second = (await api.send(alice, [bob]))["id"], (await api.send(alice, [bob]))["id"]
    for device in (phone, laptop):
        assert [(await device.expect("message.new"))["id"] for _ in range(2)] == [first, second]
    await phone.ws.send_json({"type": "read", "payload": {"ids": [first]}})
    for device in (phone, laptop):
        assert await device.expect("message.read") == {"ids": [first], "count": 1}
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    for device in (phone, laptop):
        assert await device.expect("message.read") == {"ids": [second], "count": 0}


@pytest.fixture
def tight_queue(config: Config) -> Config:
    return with_overrides(config, push={"queue_limit": 4})


def _tiny_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket whose kernel buffer cannot hide a stalled reader (no autotuning)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_slow_consumer_is_closed_with_1013_and_delays_nobody(make_client: Any, tight_queue: Config) -> None:
    api = Api(await make_client(tight_queue))
    alice, slow_user, fast_user = await api.users(3)
    stuck = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=_tiny_receive_buffer))
    slow = Device(await stuck.ws_connect(api.client.make_url("/ws/messages"), params={"token": slow_user.token}))
    # from here on the slow device reads nothing, until its server has given up on it
    fast = await Device.connect(api, fast_user)
    await fast.handshake()
    big = "慢" * 10_000  # 30 KB of UTF-8 per frame
    ids = []
    for _ in range(400):
        ids.append((await api.send(alice, [slow_user, fast_user], big))["id"])
        assert (await fast.expect("message.new"))["id"] == ids[-1]
        if slow_user.id not in connections(api):
            break
    assert slow_user.id not in connections(api), "the stuck socket was never closed"
    assert await slow.closed(timeout=10) == 1013
    assert await api.unread_count(slow_user) == len(ids)  # everything stays for the reconnect
    again = await Device.connect(api, slow_user)
    assert len((await again.handshake())["messages"]) == len(ids)
    await stuck.close()


@pytest.fixture
def fast_heartbeat(config: Config) -> Config:
    return with_overrides(config, push={"heartbeat": 0.2})


async def test_live_only_frames_before_synced_are_dropped_over_half_the_queue_not_closed(
        make_client: Any, tight_queue: Config) -> None:
    """message.sent frames arriving while the device's sync is still running wait, up to half
    the queue (2 of 4 here); more are dropped (the sent box has them), where they used to close
    the socket with 1013 once the frames held reached the queue limit. At message.synced the
    held ones are queued only as far as live-only frames may fill the queue (three quarters);
    message.unread and message.synced went straight to the idle socket (Connection.push writes
    at once when nothing is queued), so both fit."""
    api = Api(await make_client(tight_queue))
    stats = api.client.app[stats_key]
    alice, bob = await api.users(2)
    service = api.client.app[message_service_key]
    held = service.sync_point = Held(service.sync_point)
    device = await Device.connect(api, alice)
    await asyncio.wait_for(held.started.wait(), 5)  # registered; its sync point is not read yet
    sent = [await api.send(alice, [bob], f"m{i}") for i in range(6)]
    held.release.set()
    assert (await device.handshake())["messages"] == []
    assert (await device.expect("message.sent"))["id"] == sent[0]["id"]
    assert (await device.expect("message.sent"))["id"] == sent[1]["id"]
    assert stats.live_frames_dropped == 4 and stats.slow_consumer_closes == 0
    later = await api.send(alice, [bob], "after the sync")  # live again, as usual
    assert (await device.expect("message.sent"))["id"] == later["id"]
    await device.ws.send_json({"type": "ping"})
    assert (await device.next())["type"] == "pong"
    assert [f["type"] for f in device.frames] == ["connected", "message.unread", "message.synced", *["message.sent"] * 3, "pong"]


async def test_heartbeat_removes_a_silent_peer(make_client: Any, fast_heartbeat: Config) -> None:
    api = Api(await make_client(fast_heartbeat))
    bob = await api.user()
    silent = await Device.connect(api, bob, autoping=False)
    await until(lambda: bob.id in connections(api))
    await until(lambda: bob.id not in connections(api))  # never answered a ping
    assert silent.ws is not None


async def test_graceful_shutdown_closes_every_socket_with_1001(aiohttp_client: Any, config: Config) -> None:
    server = TestServer(create_app(config))
    client = await aiohttp_client(server)
    api = Api(client)
    bob = await api.user()
    devices = [await Device.connect(api, bob) for _ in range(3)]
    for device in devices:
        await device.handshake()
    meeting = await api.call("POST", "/meetings", user=bob, json={"title": "t", "participant_ids": []}, expect=201)
    room = Device(await client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": bob.token}))
    await until(lambda: meeting["id"] in client.app[rooms_key].rooms)
    await server.close()
    assert [await d.closed() for d in devices] == [1001, 1001, 1001]
    assert await room.closed() == 1001


def _short_token(user: User, ttl: int) -> str:
    """A token of the user's own login that expires sooner."""
    return TokenCodec(TEST_SECRET, ttl).issue(user.id, session_of(user))


@pytest.fixture
def early_notice(config: Config) -> Config:
    return with_overrides(config, push={"token_expiry_notice": 1.0})


async def test_token_expiry_warns_then_closes_with_4001(make_client: Any, early_notice: Config) -> None:
    api = Api(await make_client(early_notice))
    bob = await api.user()
    device = await Device.connect(api, bob, params={"token": _short_token(bob, 3)})  # exp is whole seconds: 2-3 s left
    await device.handshake()
    expiring = await device.expect("token.expiring")
    assert dt.datetime.fromisoformat(expiring["expires_at"]) > dt.datetime.now(dt.timezone.utc)
    assert await device.closed() == 4001
    await until(lambda: bob.id not in connections(api))


async def test_refresh_extends_the_connection_and_rejects_others_tokens(make_client: Any, early_notice: Config) -> None:
    api = Api(await make_client(early_notice))
    bob, eve = await api.users(2)
    device = await Device.connect(api, bob, params={"token": _short_token(bob, 3)})
    await device.handshake()
    old_expiry = dt.datetime.fromisoformat((await device.expect("token.expiring"))["expires_at"])
    await device.ws.send_json({"type": "refresh", "payload": {"token": eve.token}})
    assert (await device.expect("error"))["code"] == "wrong_user"
    await device.ws.send_json({"type": "refresh", "payload": {"token": "garbage"}})
    assert (await device.expect("error"))["code"] == "invalid_token"
    await device.ws.send_json({"type": "refresh", "payload": {"token": bob.token}})
    assert dt.datetime.fromisoformat((await device.expect("token.refreshed"))["expires_at"]) > old_expiry
    while dt.datetime.now(dt.timezone.utc) < old_expiry + dt.timedelta(milliseconds=300):
        await device.ws.send_json({"type": "ping"})
        assert (await device.next())["type"] == "pong"  # still open past the old expiry


@pytest.fixture
def two_devices_max(config: Config) -> Config:
    return with_overrides(config, push={"max_connections_per_user": 2})


async def test_a_connection_beyond_the_cap_is_closed_with_4029(make_client: Any, two_devices_max: Config) -> None:
    api = Api(await make_client(two_devices_max))
    bob = await api.user()
    first, second = await Device.connect(api, bob), await Device.connect(api, bob)
    await first.handshake()
    await second.handshake()
    third = await Device.connect(api, bob)
    assert await third.closed() == 4029
    assert len(connections(api)[bob.id]) == 2


@pytest.mark.parametrize(
    ("send", "code"),
    [("not json", "invalid_json"), ("[1, 2]", "bad_frame"), ('"ping"', "bad_frame"), ('{"type": "dance"}', "unknown_type"),
     ('{"type": "read", "payload": {"ids": "all"}}', "bad_frame"), ('{"type": "read", "payload": {"ids": [987654]}}', "not_found"),
     ('{"type": "refresh", "payload": {}}', "bad_frame")],
)
async def test_bad_client_frames_get_an_error_frame_and_the_socket_stays(api: Api, send: str, code: str) -> None:
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob)
    await device.handshake()
    await device.ws.send_str(send)
    error = await device.expect("error")
    assert error["code"] == code and error["message"]
    sent = await api.send(alice, [bob])
    assert (await device.expect("message.new"))["id"] == sent["id"]


async def test_a_read_of_someone_elses_message_changes_nothing(api: Api) -> None:
    alice, bob, eve = await api.users(3)
    theirs = await api.send(alice, [eve])
    mine = await api.send(alice, [bob])
    device = await Device.connect(api, bob)
    await device.handshake()
    await device.ws.send_json({"type": "read", "payload": {"ids": [mine["id"], theirs["id"]]}})
    assert (await device.expect("error"))["code"] == "not_found"
    assert await api.unread_count(bob) == 1 and await api.unread_count(eve) == 1


@pytest.mark.parametrize(("kind", "code"), [("binary", 1003), ("too-big", 1009)])
async def test_binary_and_oversized_frames_close_only_that_socket(api: Api, kind: str, code: int) -> None:
    alice, bob = await api.users(2)
    bad, good = await Device.connect(api, bob), await Device.connect(api, bob)
    await bad.handshake()
    await good.handshake()
    if kind == "binary":
        await bad.ws.send_bytes(b"\x00")
    else:
        await bad.ws.send_str("x" * 70_000)
    assert await bad.closed() == code
    sent = await api.send(alice, [bob])
    assert (await good.expect("message.new"))["id"] == sent["id"]
    await until(lambda: len(connections(api).get(bob.id, ())) == 1)


@pytest.fixture
def push_off(config: Config) -> Config:
    return with_overrides(config, push={"enabled": False})


async def test_push_disabled_removes_the_route_but_not_messaging(make_client: Any, push_off: Config) -> None:
    api = Api(await make_client(push_off))
    alice, bob = await api.users(2)
    resp = await api.client.get("/ws/messages", params={"token": bob.token}, headers=UPGRADE)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    sent = await api.send(alice, [bob])
    assert [m["id"] for m in (await api.call("GET", "/messages/unread", user=bob))["messages"]] == [sent["id"]]
    assert push_hub_key not in api.client.app


async def test_the_access_log_never_prints_the_token(api: Api, caplog: Any) -> None:
    caplog.set_level("INFO", logger="aiohttp.access")
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    await device.ws.close()
    await api.client.get("/ws/messages", params={"token": "bad." + bob.token}, headers=UPGRADE)
    await until(lambda: any(r.getMessage().startswith("GET /ws/messages 401 ") for r in caplog.records))
    assert bob.token not in caplog.text and bob.token.split(".")[1] not in caplog.text


async def test_many_connects_and_disconnects_leave_nothing_behind(api: Api) -> None:
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    await device.ws.close()
    await until(lambda: not connections(api))
    gc.collect()
    baseline_tasks = len(asyncio.all_tasks())
    for _ in range(200):
        device = await Device.connect(api, bob)
        await device.expect("connected")
        await device.ws.close()
    await until(lambda: not connections(api))
    await until(lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("ws-")])

    def none_left() -> bool:
        gc.collect()
        return not [o for o in gc.get_objects() if isinstance(o, UserConnection)]
    # Not at once: the test server cancels a handler whose client is gone, and a sync cancelled
    # in a query holds its connection (in the CancelledError's traceback) until SQLAlchemy has
    # finished returning the database connection; a leak would still be there after 10 s.
    await until(none_left)
    assert len(asyncio.all_tasks()) <= baseline_tasks


@pytest.fixture
def fast_sweep(config: Config) -> Config:
    return with_overrides(config, push={"cleanup_interval": 0.05})


async def test_the_sweeper_removes_closed_connections_and_empty_users(make_client: Any, fast_sweep: Config, caplog: Any) -> None:
    caplog.set_level("INFO", logger="meeting.push")
    api = Api(await make_client(fast_sweep))
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    live = next(iter(connections(api)[bob.id]))
    await device.ws.close()
    await until(lambda: not connections(api) and live.ws.closed)
    orphan = UserConnection(live.ws, bob.id, 10)  # a closed socket whose handler never unregistered it
    connections(api)[bob.id] = {orphan}
    await until(lambda: not connections(api))
    assert any("sweeper removed 1 closed connection" in r.getMessage() for r in caplog.records)
    await orphan.stop()


async def test_a_socket_keeps_neither_the_101_headers_nor_the_http_parser(api: Api) -> None:
    """Memory per socket (meeting.connection.accept, docs/performance.md): after the upgrade the
    101's headers and aiohttp's HTTP parser (a private attribute) are dropped. This fails if an
    aiohttp upgrade renames the attribute, rather than the trim silently stopping to work."""
    bob = await api.user()
    device = await Device.connect(api, bob, params={}, protocols=("bearer", bob.token))
    await device.handshake()
    (conn,) = connections(api)[bob.id]
    protocol = conn.ws._req.protocol  # type: ignore[union-attr]
    assert len(conn.ws.headers) == 0 and protocol._payload_parser is not None and protocol._parser is None
    await device.ws.send_json({"type": "ping"})
    assert (await device.next())["type"] == "pong"
    assert device.ws.protocol == "bearer"


@pytest.mark.parametrize("since", ["-1", "x", "99999999999999999999"])
async def test_a_bad_since_is_422_before_upgrade(api: Api, since: str) -> None:
    bob = await api.user()
    resp = await api.client.get("/ws/messages", params={"token": bob.token, "since": since}, headers=UPGRADE)
    assert resp.status == 422 and "since" in (await resp.json())["error"]["details"]
    assert connections(api) == {}


@pytest.mark.parametrize("compress", [False, True])
async def test_permessage_deflate_only_when_configured(make_client: Any, config: Config, compress: bool) -> None:
    """Browsers ask for deflate; by default the server declines (memory per socket)."""
    api = Api(await make_client(with_overrides(config, push={"compress": compress})))
    alice, bob = await api.users(2)
    device = await Device.connect(api, bob, compress=15)
    assert bool(device.ws.compress) is compress  # what the handshake negotiated
    await device.expect("connected")
    await device.expect("message.unread")
    await device.expect("message.synced")
    sent = await api.send(alice, [bob], "zipped or not")
    assert (await device.expect("message.new"))["id"] == sent["id"]
    await device.ws.close()
