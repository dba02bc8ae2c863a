"""Idempotency-Key on POST /messages and POST /meetings, through real HTTP, on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from typing import Any, AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from meeting.config import Config, with_overrides
from meeting.db import create_engine, idempotency_keys
from meeting.storage import idempotency as key_store
from tests.helpers import Api, User


@pytest.fixture
async def engine(config: Config) -> AsyncIterator[Any]:
    """A second view of the test database, to look at rows the API does not show."""
    engine = create_engine(config.database)
    yield engine
    await engine.dispose()


async def post(api: Api, path: str, user: User, body: Any, key: str | None) -> tuple[int, str, dict[str, str]]:
    headers = {**user.headers, **({"Idempotency-Key": key} if key is not None else {})}
    resp = await api.client.post(path, json=body, headers=headers)
    return resp.status, await resp.text(), dict(resp.headers)


async def inbox(api: Api, user: User) -> list[int]:
    return [m["id"] for m in (await api.call("GET", "/messages", user=user, expect=200))["messages"]]


async def key_rows(engine: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys))).scalar_one())


async def test_a_replay_answers_the_same_bytes_and_stores_nothing(api: Api, engine: Any) -> None:
    alice, bob = await api.users(2)
    body = {"recipient_ids": [bob.id], "content": "once 🍜"}
    key = str(uuid.uuid4())
    first = await post(api, "/messages", alice, body, key)
    assert first[0] == 201
    again = await post(api, "/messages", alice, {"content": "once 🍜", "recipient_ids": [bob.id]}, f'"{key}"')  # key order, quoted form
    assert again[:2] == first[:2]
    assert len(await inbox(api, bob)) == 1 and await api.unread_count(bob) == 1
    assert len((await api.call("GET", "/messages/sent", user=alice, expect=200))["messages"]) == 1
    assert await key_rows(engine) == 1
    unkeyed = await post(api, "/messages", alice, body, None)  # no key: an ordinary, new send
    assert unkeyed[0] == 201 and unkeyed[1] != first[1] and len(await inbox(api, bob)) == 2


async def test_the_same_key_with_another_body_or_route_is_422(api: Api) -> None:
    alice, bob = await api.users(2)
    key = "order-42"
    assert (await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "a"}, key))[0] == 201
    status, text, _ = await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "b"}, key)
    assert status == 422 and '"code":"idempotency_key_reused"' in text
    status, text, _ = await post(api, "/meetings", alice, {"title": "t", "participant_ids": [bob.id]}, key)
    assert status == 422 and '"code":"idempotency_key_reused"' in text
    assert len(await inbox(api, bob)) == 1  # neither the second message nor the meeting's invitation
    assert (await api.call("GET", "/meetings", user=alice, expect=200))["meetings"] == []


async def test_keys_are_per_user_and_case_sensitive(api: Api) -> None:
    alice, carol, bob = await api.users(3)
    body = {"recipient_ids": [bob.id], "content": "same"}
    a = await post(api, "/messages", alice, body, "shared")
    c = await post(api, "/messages", carol, body, "shared")
    upper = await post(api, "/messages", alice, body, "SHARED")
    assert a[0] == c[0] == upper[0] == 201 and len({a[1], c[1], upper[1]}) == 3
    assert len(await inbox(api, bob)) == 3


async def test_a_failed_request_stores_no_key_so_its_retry_runs(api: Api, engine: Any) -> None:
    alice, bob = await api.users(2)
    status, text, _ = await post(api, "/messages", alice, {"recipient_ids": [bob.id + 1000], "content": "x"}, "k1")
    assert status == 422 and '"unknown_ids"' in text
    assert await key_rows(engine) == 0
    assert (await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "x"}, "k1"))[0] == 201
    assert len(await inbox(api, bob)) == 1


async def test_concurrent_duplicates_store_one_message_and_answer_alike(api: Api) -> None:
    alice, bob = await api.users(2)
    body = {"recipient_ids": [bob.id], "content": "race"}
    answers = await asyncio.gather(*(post(api, "/messages", alice, body, "race-1") for _ in range(6)))
    assert {a[0] for a in answers} == {201} and len({a[1] for a in answers}) == 1
    assert len(await inbox(api, bob)) == 1
    # the same key with two bodies at once: one wins, the other is told the key is taken
    mixed = await asyncio.gather(post(api, "/messages", alice, {**body, "content": "one"}, "race-2"),
                                 post(api, "/messages", alice, {**body, "content": "two"}, "race-2"))
    assert sorted(a[0] for a in mixed) == [201, 422]
    assert len(await inbox(api, bob)) == 2


async def test_a_replay_sharing_a_batch_with_new_sends_costs_them_nothing(api: Api, engine: Any) -> None:
    """A batch is first written without looking its keys up; a replayed key in it rolls that
    attempt back whole and the batch runs again with the lookup: the replay answers the first
    bytes, every new send is stored once, and the recipient's seqs have no hole."""
    alice, bob = await api.users(2)
    first = await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "first"}, "again")
    assert first[0] == 201
    sends = [post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "first"}, "again")]
    sends += [post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": f"new {i}"}, f"new-{i}") for i in range(4)]
    sends += [post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "unkeyed"}, None)]
    replay, *rest = await asyncio.gather(*sends)
    assert replay[:2] == first[:2]
    assert [a[0] for a in rest] == [201] * 5 and len({a[1] for a in rest}) == 5
    received = (await api.call("GET", "/messages?after_seq=0", user=bob, expect=200))["messages"]
    assert sorted(m["content"] for m in received) == sorted(["first", "unkeyed", *(f"new {i}" for i in range(4))])
    assert [m["seq"] for m in received] == list(range(1, 7))
    assert await key_rows(engine) == 5


async def test_meetings_replay_without_a_second_meeting_or_invitation(api: Api) -> None:
    alice, bob = await api.users(2)
    body = {"title": "Design review", "participant_ids": [bob.id], "starts_at": "2026-12-01T09:30:00+08:00"}
    answers = await asyncio.gather(*(post(api, "/meetings", alice, body, "meet-1") for _ in range(3)))
    assert {a[0] for a in answers} == {201} and len({a[1] for a in answers}) == 1
    later = await post(api, "/meetings", alice, body, "meet-1")
    assert later[:2] == answers[0][:2]
    assert len((await api.call("GET", "/meetings", user=bob, expect=200))["meetings"]) == 1
    assert len(await inbox(api, bob)) == 1
    status, text, _ = await post(api, "/meetings", alice, {**body, "title": "Other"}, "meet-1")
    assert status == 422 and "idempotency_key_reused" in text


@pytest.mark.parametrize("key", ["", '""', "é-key", "tab\tkey", '"unterminated', '"bad\\q"', "x" * 256, '"' + "x" * 256 + '"',
                                 '" k"', '"k "', '" "'])
async def test_a_malformed_key_is_400_and_stores_nothing(api: Api, key: str) -> None:
    alice, bob = await api.users(2)
    resp = await api.client.post("/messages", json={"recipient_ids": [bob.id], "content": "x"},
                                 headers={**alice.headers, "Idempotency-Key": key}, skip_auto_headers=())
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "invalid_idempotency_key", body
    assert await inbox(api, bob) == []


async def test_keys_that_differ_only_by_outer_spaces_are_400_on_both_backends(api: Api, engine: Any) -> None:
    """MariaDB's ascii_bin compares 'k' = 'k ' (PAD SPACE), SQLite does not: such a key used to
    be a new key to the lookup but a duplicate to the unique index on MariaDB, hence a 500."""
    alice, bob = await api.users(2)
    assert (await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "a"}, "k"))[0] == 201
    for path, body, key in (("/messages", {"recipient_ids": [bob.id], "content": "b"}, '"k "'),
                            ("/meetings", {"title": "t", "participant_ids": [bob.id]}, '"k  "'),
                            ("/meetings", {"title": "t", "participant_ids": [bob.id]}, '"  k"')):
        status, text, _ = await post(api, path, alice, body, key)
        assert status == 400 and '"code":"invalid_idempotency_key"' in text, (path, key, status, text)
    assert len(await inbox(api, bob)) == 1 and await key_rows(engine) == 1
    assert (await api.call("GET", "/meetings", user=alice, expect=200))["meetings"] == []


async def test_a_key_row_the_lookup_misses_is_409_not_500(api: Api, engine: Any) -> None:
    """The safety net: a stored row that blocks the insert but that the lookup does not return
    (on MariaDB a key with a trailing space, which a server before the space check stored, is
    'k' to the unique index) fails the send and its retry: 409, nothing stored. SQLite
    compares 'k ' and 'k' as different keys, so there both run."""
    alice, bob = await api.users(2)
    async with engine.begin() as conn:
        await conn.execute(idempotency_keys.insert(), [
            {"user_id": alice.id, "idempotency_key": key, "fingerprint": "0" * 64, "status": 201, "response": "{}",
             "created_at": dt.datetime.now(dt.timezone.utc)} for key in ("k ", "m ")])
    pads = engine.dialect.name in ("mysql", "mariadb")
    for path, body, key in (("/messages", {"recipient_ids": [bob.id], "content": "x"}, "k"),
                            ("/meetings", {"title": "t", "participant_ids": [bob.id]}, "m")):
        status, text, _ = await post(api, path, alice, body, key)
        if pads:
            assert status == 409 and '"code":"idempotency_key_in_use"' in text, (path, status, text)
        else:
            assert status == 201, (path, status, text)
    assert len(await inbox(api, bob)) == (0 if pads else 2)
    assert len((await api.call("GET", "/meetings", user=alice, expect=200))["meetings"]) == (0 if pads else 1)


async def test_two_key_headers_are_400_and_the_limit_is_configurable(make_client: Any, config: Config) -> None:
    api = Api(await make_client(with_overrides(config, idempotency={"max_key_length": 8})))
    alice, bob = await api.users(2)
    body = {"recipient_ids": [bob.id], "content": "x"}
    two = await api.client.post("/messages", json=body, headers=[*alice.headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    assert two.status == 400 and (await two.json())["error"]["code"] == "invalid_idempotency_key"
    assert (await post(api, "/messages", alice, body, "x" * 9))[0] == 400
    assert (await post(api, "/messages", alice, body, '"a\\"b c"'))[0] == 201  # quoted, with an escape: 5 characters
    assert len(await inbox(api, bob)) == 1


async def test_a_second_instance_on_the_same_database_replays(make_client: Any, config: Config) -> None:
    one, two = Api(await make_client(config)), Api(await make_client(config))
    alice, bob = await one.users(2)
    body = {"recipient_ids": [bob.id], "content": "across"}
    first = await post(one, "/messages", alice, body, "inst-1")
    assert (await post(two, "/messages", alice, body, "inst-1"))[:2] == first[:2]
    both = await asyncio.gather(*(post(api, "/messages", alice, {**body, "content": "both"}, "inst-2") for api in (one, two, one, two)))
    assert {a[0] for a in both} == {201} and len({a[1] for a in both}) == 1
    assert len(await inbox(two, bob)) == 2


async def test_an_expired_key_is_new_again_and_the_pruner_deletes_it(make_client: Any, config: Config, engine: Any) -> None:
    api = Api(await make_client(with_overrides(config, idempotency={"ttl": 3600, "prune_interval": 0.05})))
    alice, bob = await api.users(2)
    body = {"recipient_ids": [bob.id], "content": "old"}
    first = await post(api, "/messages", alice, body, "old-1")
    assert first[0] == 201
    async with engine.begin() as conn:  # an hour and a second later
        await conn.execute(idempotency_keys.update().values(created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=3601)))
    deadline = time.monotonic() + 10
    while await key_rows(engine):
        assert time.monotonic() < deadline, "the pruner never deleted the expired key"
        await asyncio.sleep(0.05)
    again = await post(api, "/messages", alice, body, "old-1")
    assert again[0] == 201 and again[1] != first[1]
    assert len(await inbox(api, bob)) == 2 and await key_rows(engine) == 1


async def test_an_expired_key_not_pruned_yet_is_new_again(make_client: Any, config: Config, engine: Any) -> None:
    api = Api(await make_client(with_overrides(config, idempotency={"ttl": 3600})))  # the pruner waits 10 minutes
    alice, bob = await api.users(2)
    body = {"title": "t", "participant_ids": [bob.id]}
    first = await post(api, "/meetings", alice, body, "old-2")
    async with engine.begin() as conn:
        await conn.execute(idempotency_keys.update().values(created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=3601)))
    again = await post(api, "/meetings", alice, body, "old-2")
    assert first[0] == again[0] == 201 and again[1] != first[1]
    assert len((await api.call("GET", "/meetings", user=alice, expect=200))["meetings"]) == 2 and await key_rows(engine) == 1


async def test_the_pruner_keeps_a_key_row_written_after_it_selected_the_expired_one(api: Api, config: Config, engine: Any) -> None:
    """prune selects expired rows without a lock, then deletes them. A send that reuses an
    expired key between the two (deletes the old row, commits a fresh one: another connection,
    here run just before the prune's DELETE reaches the database) must keep its row, or a retry
    within the TTL would store the message twice (`api`: a migrated database). On SQLite the prune holds the write lock from
    BEGIN IMMEDIATE, so that send cannot commit in between: it fails on the lock instead."""
    now = dt.datetime.now(dt.timezone.utc)
    row = {"user_id": 7, "idempotency_key": "again", "fingerprint": "0" * 64, "status": 201, "response": "{}"}
    async with engine.begin() as conn:
        await key_store.insert(conn, [{**row, "created_at": now - dt.timedelta(hours=2)}])
    url = make_url(config.database.url)
    sqlite = url.get_backend_name() == "sqlite"
    other = sa.create_engine(url.set(drivername="sqlite" if sqlite else "mysql+pymysql"),
                             connect_args={"timeout": 0.2} if sqlite else {})
    reuse: list[str] = []

    def reuse_the_key(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if reuse or not statement.lstrip().upper().startswith("DELETE FROM IDEMPOTENCY_KEYS"):
            return
        try:
            with other.begin() as c:
                c.execute(idempotency_keys.delete().where(idempotency_keys.c.user_id == 7))
                c.execute(idempotency_keys.insert().values(**row, created_at=now))
            reuse.append("committed")
        except OperationalError:
            reuse.append("locked")

    sa.event.listen(engine.sync_engine, "before_cursor_execute", reuse_the_key)
    try:
        async with engine.begin() as conn:
            gone = await key_store.prune(conn, now - dt.timedelta(hours=1), 10)
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", reuse_the_key)
        other.dispose()
    async with engine.connect() as conn:
        rows = await key_store.found(conn, [(7, "again")])
    if sqlite:
        assert reuse == ["locked"] and gone == 1 and rows == {}
    else:
        assert reuse == ["committed"] and (7, "again") in rows, "the pruner deleted the fresh row"
        assert rows[(7, "again")]["created_at"] >= now - dt.timedelta(seconds=1) and gone == 0, (rows, gone)
