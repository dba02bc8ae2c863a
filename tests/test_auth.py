import asyncio
import datetime as dt
from typing import Any

import jwt
import pytest

from meeting.auth import TokenCodec
from meeting.errors import Unauthorized
from tests.conftest import TEST_SECRET
from tests.helpers import Api

REGISTER = "/auth/register"
LOGIN = "/auth/login"


async def test_register_returns_the_public_user(api: Api) -> None:
    body = await api.call("POST", REGISTER, json={"username": "Bob_1", "password": "password123", "display_name": "Bob"}, expect=201)
    assert set(body) == {"id", "username", "display_name", "created_at"}
    assert body["username"] == "bob_1" and body["display_name"] == "Bob"
    assert dt.datetime.fromisoformat(body["created_at"]).utcoffset() == dt.timedelta(0)


async def test_register_taken_username_is_409_case_insensitively(api: Api) -> None:
    await api.call("POST", REGISTER, json={"username": "carol", "password": "password123"}, expect=201)
    body = await api.call("POST", REGISTER, json={"username": "CAROL", "password": "password456"}, expect=409)
    assert body["error"]["code"] == "username_taken"


async def test_concurrent_registrations_of_one_name_give_one_201_and_409s(api: Api) -> None:
    responses = await asyncio.gather(*[
        api.client.post(REGISTER, json={"username": "racer", "password": f"password{i}"}) for i in range(4)
    ])
    statuses = sorted(r.status for r in responses)
    assert statuses == [201, 409, 409, 409]
    for r in responses:
        if r.status == 409:
            assert (await r.json())["error"]["code"] == "username_taken"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab", "password": "password123"}, "username"),
        ({"username": "a" * 33, "password": "password123"}, "username"),
        ({"username": "bad name", "password": "password123"}, "username"),
        ({"username": "dave", "password": "short"}, "password"),
        ({"username": "dave", "password": "p" * 129}, "password"),
        ({"username": "dave", "password": "password123", "display_name": "x" * 65}, "display_name"),
        ({"password": "password123"}, "username"),
        ({"username": 5, "password": "password123"}, "username"),
    ],
)
async def test_register_validation_is_422_with_details(api: Api, body: dict, field: str) -> None:
    resp = await api.call("POST", REGISTER, json=body, expect=422)
    assert resp["error"]["code"] == "validation_error"
    assert field in resp["error"]["details"]


async def test_login_returns_a_bearer_token_for_the_user(api: Api) -> None:
    created = await api.call("POST", REGISTER, json={"username": "erin", "password": "password123"}, expect=201)
    body = await api.call("POST", LOGIN, json={"username": "Erin", "password": "password123"}, expect=200)
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert body["user"] == created
    claims = jwt.decode(body["access_token"], TEST_SECRET, algorithms=["HS256"], audience="meeting", issuer="meeting")
    assert claims["sub"] == str(created["id"]) and claims["exp"] - claims["iat"] == 3600 and isinstance(claims["sid"], int)
    assert len(body["refresh_token"]) >= 40 and body["refresh_expires_in"] == 30 * 24 * 3600
    me = await api.call("GET", "/users/me", headers={"Authorization": f"Bearer {body['access_token']}"}, expect=200)
    assert me == created


async def test_unknown_user_and_wrong_password_get_the_same_401(api: Api) -> None:
    await api.call("POST", REGISTER, json={"username": "frank", "password": "password123"}, expect=201)
    wrong = await api.call("POST", LOGIN, json={"username": "frank", "password": "password124"}, expect=401)
    unknown = await api.call("POST", LOGIN, json={"username": "nobody", "password": "password123"}, expect=401)
    assert wrong == unknown
    assert wrong["error"]["code"] == "invalid_credentials"


def _token(**overrides: Any) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    claims = {"sub": "1", "iat": now, "exp": now + dt.timedelta(hours=1), **overrides}
    return jwt.encode(claims, overrides.pop("key", TEST_SECRET), algorithm="HS256")


def _none_alg_token() -> str:
    return jwt.encode({"sub": "1", "iat": 1, "exp": 4102444800}, None, algorithm="none")


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_token"),
        ("Bearer", "missing_token"),
        ("Basic dXNlcjpwYXNz", "missing_token"),
        ("Bearer not.a.jwt", "invalid_token"),
        ("Bearer " + jwt.encode({"sub": "1", "iat": 1, "exp": 4102444800}, "another-secret-of-thirty-two-chars!!", algorithm="HS256"), "invalid_token"),
        ("Bearer " + _none_alg_token(), "invalid_token"),
        ("Bearer " + jwt.encode({"sub": "1", "sid": 1, "iss": "meeting", "aud": "meeting", "iat": 1, "exp": 1000}, TEST_SECRET,
                                algorithm="HS256"), "token_expired"),
        ("Bearer " + jwt.encode({"sub": "1", "sid": 1, "iss": "other", "aud": "meeting", "iat": 1, "exp": 4102444800}, TEST_SECRET,
                                algorithm="HS256"), "invalid_token"),
        ("Bearer " + jwt.encode({"sub": "1", "sid": 1, "iss": "meeting", "aud": "other", "iat": 1, "exp": 4102444800}, TEST_SECRET,
                                algorithm="HS256"), "invalid_token"),
        ("Bearer " + jwt.encode({"sub": "1", "sid": "1", "iss": "meeting", "aud": "meeting", "iat": 1, "exp": 4102444800},
                                TEST_SECRET, algorithm="HS256"), "invalid_token"),
        ("Bearer " + jwt.encode({"sub": "1", "iss": "meeting", "aud": "meeting", "iat": 1, "exp": 4102444800}, TEST_SECRET,
                                algorithm="HS256"), "invalid_token"),  # no sid: issued before sessions, or forged
        ("Bearer " + jwt.encode({"sub": "x", "iat": 1, "exp": 4102444800}, TEST_SECRET, algorithm="HS256"), "invalid_token"),
        ("Bearer " + jwt.encode({"iat": 1, "exp": 4102444800}, TEST_SECRET, algorithm="HS256"), "invalid_token"),
    ],
)
async def test_bad_tokens_get_401(api: Api, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header else {}
    body = await api.call("GET", "/users/me", headers=headers, expect=401)
    assert body["error"]["code"] == code


async def test_identity_comes_from_the_token_not_the_body(api: Api) -> None:
    alice, bob = await api.users(2)
    me = await api.call("GET", "/users/me", user=alice, params={"user_id": bob.id}, expect=200)
    assert me["id"] == alice.id


def test_a_verified_token_is_remembered_until_it_expires_and_the_memory_is_bounded() -> None:
    now = [dt.datetime.now(dt.timezone.utc).timestamp()]
    codec = TokenCodec(TEST_SECRET, ttl=60, cache_size=2, clock=lambda: now[0])
    token = codec.issue(7, 1)
    assert codec.decode(token).user_id == 7
    assert codec.decode(token).user_id == 7  # from memory
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(Unauthorized) as refused:
        codec.decode(forged)  # never trusted because it resembles a remembered token
    assert refused.value.code == "invalid_token"
    others = [codec.issue(n, 1) for n in (8, 9)]
    assert [codec.decode(t).user_id for t in others] == [8, 9]
    assert len(codec._verified) == 2  # bounded: the oldest went out
    now[0] += 61
    for t in others:
        with pytest.raises(Unauthorized) as expired:
            codec.decode(t)
        assert expired.value.code == "token_expired"


async def test_logins_past_the_hashing_queue_get_503_at_once_and_real_ones_go_on(make_client: Any, config: Any) -> None:
    """One hashing thread and one waiting place: of a burst of logins, at most two are
    admitted and the rest answer 503 + Retry-After without queueing; afterwards a login
    gets through as usual."""
    from meeting.config import with_overrides

    slow = with_overrides(config, auth={"hash_time_cost": 4, "hash_memory_kib": 65536, "hash_workers": 1, "hash_queue": 1})
    api = Api(await make_client(slow))
    await api.call("POST", REGISTER, json={"username": "dora", "password": "password123"}, expect=201)
    answers = await asyncio.gather(*(api.client.post(LOGIN, json={"username": "dora", "password": "wrong-password"}) for _ in range(12)))
    statuses = sorted(r.status for r in answers)
    # two admitted at a time; one hash takes far longer than the burst takes to arrive
    assert statuses.count(401) >= 2 and statuses.count(503) >= 6, statuses
    assert set(statuses) <= {401, 503}
    busy = [r for r in answers if r.status == 503]
    assert all(r.headers["Retry-After"] == "1" for r in busy)
    assert {(await r.json())["error"]["code"] for r in busy} == {"auth_busy"}
    await api.call("POST", LOGIN, json={"username": "dora", "password": "password123"}, expect=200)


async def test_login_upgrades_a_hash_made_with_weaker_settings(make_client: Any, config: Any, db_url: str) -> None:
    import sqlalchemy as sa

    from meeting.config import with_overrides
    from meeting.db import create_engine, users

    weak = Api(await make_client(config))  # the suite's cheap argon2 settings
    await weak.call("POST", REGISTER, json={"username": "erin", "password": "password123"}, expect=201)
    stronger = with_overrides(config, auth={"hash_time_cost": 2, "hash_memory_kib": 2048})
    api = Api(await make_client(stronger))
    engine = create_engine(config.database)
    try:
        async def stored() -> str:
            async with engine.connect() as conn:
                return (await conn.execute(sa.select(users.c.password_hash).where(users.c.username == "erin"))).scalar_one()
        before = await stored()
        assert "m=1024,t=1" in before
        await api.call("POST", LOGIN, json={"username": "erin", "password": "password123"}, expect=200)
        after = await stored()
        assert "m=2048,t=2" in after and after != before
        await api.call("POST", LOGIN, json={"username": "erin", "password": "password123"}, expect=200)
        assert await stored() == after  # up to date now: not hashed again
    finally:
        await engine.dispose()
