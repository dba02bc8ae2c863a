"""Token lifecycle: refresh tokens that rotate, logout, logout-all, and revocation that
holds on REST, on every WebSocket auth way and on live sockets, on every instance."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from meeting.config import Config
from meeting.db import create_engine, readers, refresh_tokens
from tests.helpers import Api, Device, User


async def _login(api: Api, user: User) -> User:
    """Another login (another device, another session) of the same user."""
    body = await api.call("POST", "/auth/login", json={"username": user.username, "password": "correct horse"}, expect=200)
    return User(user.id, user.username, body["access_token"], body["refresh_token"])


async def _refresh(api: Api, refresh_token: str, expect: int = 200) -> dict[str, Any]:
    return await api.call("POST", "/auth/refresh", json={"refresh_token": refresh_token}, expect=expect)


async def _logout(api: Api, user: User) -> None:
    resp = await api.client.post("/auth/logout", headers=user.headers)
    assert resp.status == 204 and await resp.read() == b""


async def _refused_everywhere(api: Api, user: User, code: str = "token_revoked") -> None:
    """401 on REST and before the upgrade on /ws/messages in each of the three ways."""
    body = await api.call("GET", "/users/me", user=user, expect=401)
    assert body["error"]["code"] == code
    for kwargs in ({"params": {"token": user.token}}, {"headers": user.headers}, {"protocols": ("bearer", user.token)}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await api.client.ws_connect("/ws/messages", **kwargs)
        assert refused.value.status == 401


async def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_session(api: Api) -> None:
    alice = await api.user()
    fresh = await _refresh(api, alice.refresh_token)
    assert fresh["token_type"] == "bearer" and fresh["refresh_token"] != alice.refresh_token and "user" not in fresh
    rotated = User(alice.id, alice.username, fresh["access_token"], fresh["refresh_token"])
    assert (await api.call("GET", "/users/me", user=rotated, expect=200))["id"] == alice.id
    # The spent token again: someone else holds a copy. The session ends for both.
    body = await _refresh(api, alice.refresh_token, expect=401)
    assert body["error"]["code"] == "refresh_token_reused"
    assert (await _refresh(api, rotated.refresh_token, expect=401))["error"]["code"] == "token_revoked"
    await _refused_everywhere(api, rotated)
    await _refused_everywhere(api, alice)


async def test_unknown_or_expired_refresh_tokens_are_401(api: Api, config: Config) -> None:
    alice = await api.user()
    assert (await _refresh(api, "not-a-token", expect=401))["error"]["code"] == "invalid_refresh_token"
    engine = create_engine(config.database)
    try:
        async with engine.begin() as conn:
            await conn.execute(refresh_tokens.update().values(expires_at=sa.func.current_timestamp()))
    finally:
        await engine.dispose()
    assert (await _refresh(api, alice.refresh_token, expect=401))["error"]["code"] == "refresh_token_expired"


async def test_logout_ends_this_session_only_and_closes_its_sockets_with_4001(api: Api) -> None:
    alice = await api.user()
    phone = await _login(api, alice)
    meeting = await api.call("POST", "/meetings", user=alice, json={"title": "t", "participant_ids": []}, expect=201)
    laptop_push = Device(await api.client.ws_connect("/ws/messages", params={"token": alice.token}))
    laptop_room = Device(await api.client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": alice.token}))
    phone_push = Device(await api.client.ws_connect("/ws/messages", params={"token": phone.token}))
    await laptop_push.handshake()
    await phone_push.handshake()
    await _logout(api, alice)
    assert await laptop_push.closed(timeout=2) == 4001 and await laptop_room.closed(timeout=2) == 4001
    await _refused_everywhere(api, alice)
    assert (await _refresh(api, alice.refresh_token, expect=401))["error"]["code"] == "token_revoked"
    # the phone's session goes on
    await api.call("GET", "/users/me", user=phone, expect=200)
    await phone_push.ws.send_json({"type": "ping"})
    assert await phone_push.expect("pong") == {}


async def test_logout_all_ends_every_session(api: Api) -> None:
    alice, bob = await api.users(2)
    phone = await _login(api, alice)
    devices = [Device(await api.client.ws_connect("/ws/messages", params={"token": u.token})) for u in (alice, phone, bob)]
    for device in devices:
        await device.handshake()
    assert await api.call("POST", "/auth/logout-all", user=phone, expect=200) == {"sessions": 2}
    assert [await d.closed(timeout=2) for d in devices[:2]] == [4001, 4001]
    await _refused_everywhere(api, alice)
    await _refused_everywhere(api, phone)
    await api.send(bob, [bob])  # bob is untouched
    assert (await devices[2].expect("message.new"))["content"] == "hello"


async def test_the_websocket_refresh_frame_takes_a_token_from_the_refresh_flow(api: Api) -> None:
    alice = await api.user()
    device = Device(await api.client.ws_connect("/ws/messages", params={"token": alice.token}))
    await device.handshake()
    fresh = await _refresh(api, alice.refresh_token)
    await device.ws.send_json({"type": "refresh", "payload": {"token": fresh["access_token"]}})
    assert "expires_at" in await device.expect("token.refreshed")
    other = await _login(api, alice)
    await _logout(api, other)
    await device.ws.send_json({"type": "refresh", "payload": {"token": other.token}})  # a logged-out session's token
    assert (await device.expect("error"))["code"] == "token_revoked"


async def test_a_token_of_a_session_that_never_existed_is_401(api: Api) -> None:
    from meeting.auth import TokenCodec
    from tests.conftest import TEST_SECRET

    alice = await api.user()
    forged = User(alice.id, alice.username, TokenCodec(TEST_SECRET, 60).issue(alice.id, 10**12))  # right key, no such login
    await _refused_everywhere(api, forged)
    ghost = User(10**12, "ghost", TokenCodec(TEST_SECRET, 60).issue(10**12, 1))  # a user who does not exist
    await _refused_everywhere(api, ghost)


async def test_a_logout_on_one_instance_closes_sockets_on_another_within_a_poll(make_client: Any, config: Config) -> None:
    """Two instances on one database: the socket on B closes with 4001 within
    auth.revocation_poll (0.5 s) of the logout answered by A, and B refuses the token."""
    a, b = Api(await make_client(config)), Api(await make_client(config))
    alice = await a.user()
    on_b = Device(await b.client.ws_connect("/ws/messages", params={"token": alice.token}))
    await on_b.handshake()
    await b.call("GET", "/users/me", user=alice, expect=200)  # B now knows the session as live
    started = time.monotonic()
    await _logout(a, alice)
    assert await on_b.closed(timeout=5) == 4001
    assert time.monotonic() - started < 3  # the poll is 0.5 s; generous for a loaded CI box
    await _refused_everywhere(b, alice)


def _liveness_questions(api: Api) -> list[str]:
    """Every "is this session live" query the app's engine runs from now on (real statements)."""
    from meeting.typedefs import engine_key

    asked: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM auth_sessions" in statement and "JOIN users" in statement:
            asked.append(statement)

    engine = api.client.server.app[engine_key]
    sa.event.listen(engine.sync_engine, "before_cursor_execute", seen)
    if readers(engine).sync_engine.pool is not engine.sync_engine.pool:  # MariaDB's autocommit pool for reads
        sa.event.listen(readers(engine).sync_engine, "before_cursor_execute", seen)
    return asked


async def test_a_session_is_asked_about_once_however_many_requests_bring_it(make_client: Any, config: Config) -> None:
    """The instance that logged a user in knows the session is live; another instance asks
    the database once for all the requests (a reconnect storm's devices) that bring it together."""
    a, b = Api(await make_client(config)), Api(await make_client(config))
    on_a, on_b = _liveness_questions(a), _liveness_questions(b)
    alice = await a.user()
    await a.call("GET", "/users/me", user=alice, expect=200)
    assert on_a == []
    answers = await asyncio.gather(*(b.call("GET", "/users/me", user=alice, expect=200) for _ in range(20)))
    assert {body["id"] for body in answers} == {alice.id}
    assert len(on_b) == 1
    await _logout(a, alice)
    await _refused_everywhere(a, alice)


async def test_two_racing_refreshes_of_one_token_revoke_the_session(api: Api) -> None:
    """Rotation allows one use: a second, even concurrent, means a copy exists."""
    alice = await api.user()
    answers = await asyncio.gather(*(api.client.post("/auth/refresh", json={"refresh_token": alice.refresh_token}) for _ in range(2)))
    assert sorted(r.status for r in answers) == [200, 401]
    await _refused_everywhere(api, alice)


async def test_a_logout_while_a_websocket_connects_still_closes_it(api: Api) -> None:
    """The session is checked before the upgrade and the socket joins the hub after it;
    a logout in between must not leave an open socket that no revocation will reach."""
    from meeting.typedefs import presence_key

    alice = await api.user()
    presence = api.client.app[presence_key]
    admit = presence.admit

    async def logout_first(*args: Any, **kwargs: Any) -> Any:  # the logout lands mid-connect
        presence.admit = admit
        await _logout(api, alice)
        return await admit(*args, **kwargs)

    presence.admit = logout_first
    device = Device(await api.client.ws_connect("/ws/messages", params={"token": alice.token}))
    assert await device.closed(timeout=2) == 4001


async def test_a_fast_clock_on_one_instance_does_not_hide_later_revocations(make_client: Any, config: Config) -> None:
    from meeting.db import auth_sessions
    from meeting.typedefs import sessions_key

    a, b = Api(await make_client(config)), Api(await make_client(config))
    alice, bob = await a.users(2)
    engine = create_engine(config.database)
    try:  # alice's session was revoked by an instance whose clock runs 10 s fast
        async with engine.begin() as conn:
            await conn.execute(auth_sessions.update().where(auth_sessions.c.user_id == alice.id)
                               .values(revoked_at=sa.func.datetime("now", "+10 seconds") if "sqlite" in config.database.url
                                       else sa.text("UTC_TIMESTAMP(6) + INTERVAL 10 SECOND")))
    finally:
        await engine.dispose()
    await b.client.app[sessions_key].poll()
    await _logout(a, bob)  # stamped by a correct clock, before the fast one's time
    await b.client.app[sessions_key].poll()
    await _refused_everywhere(b, bob)


async def test_parallel_guesses_cannot_slip_past_the_failed_login_limit(make_client: Any, config: Config) -> None:
    from meeting.config import with_overrides

    api = Api(await make_client(with_overrides(config, limits={"enabled": True, "login_failures_per_username": "10/15 minutes"})))
    alice = await api.user()  # one login: a success clears the count
    guesses = [{"username": alice.username, "password": "correct horse" if i == 35 else f"guess-{i}"} for i in range(40)]
    answers = await asyncio.gather(*(api.client.post("/auth/login", json=g) for g in guesses))
    statuses = [r.status for r in answers]
    assert statuses.count(401) + statuses.count(200) == 10 and statuses.count(429) == 30
    assert statuses[35] == 429  # the right password, after the limit: refused like the rest


@pytest.mark.parametrize("name", ["alice ", " alice", "alice\t", "ALICE  "])
async def test_login_usernames_are_matched_in_full(api: Api, name: str) -> None:
    await api.user("alice")
    body = await api.call("POST", "/auth/login", json={"username": name, "password": "correct horse"}, expect=422)
    assert list(body["error"]["details"]) == ["username"]
