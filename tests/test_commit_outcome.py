"""A send whose COMMIT fails is never retried blindly: the service asks the database.

On MariaDB the fault is real: a TCP proxy (tests.faults) cuts the app's connection
at the COMMIT, either before the server gets it (not applied) or after the server
committed and answered (applied, answer lost), or cuts and refuses every connection
(nobody can tell). On SQLite, where a COMMIT only fails on an I/O error, the fault
is injected in the driver's commit (an engine `commit` event) around a real commit;
the storage code above it is the real one.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

from meeting.config import Config
from meeting.db import create_engine, meetings, messages
from meeting.idempotency import Once, Response
from meeting.typedefs import engine_key, message_service_key
from tests.conftest import _clean_mariadb, base_config
from tests.faults import CommitCutter
from tests.helpers import Api, User


@pytest.fixture
async def cutter(mariadb_url: str) -> AsyncIterator[CommitCutter]:
    _clean_mariadb(mariadb_url)
    url = make_url(mariadb_url)
    proxy = CommitCutter(url.host or "127.0.0.1", url.port or 3306)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def proxied(make_client: Any, mariadb_url: str, cutter: CommitCutter) -> Api:
    url = make_url(mariadb_url).set(port=cutter.port).render_as_string(hide_password=False)
    return Api(await make_client(base_config(database={"url": url})))


async def count(db_url: str, table: sa.Table, **where: Any) -> int:
    engine = create_engine(base_config(database={"url": db_url}).database)
    try:
        async with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(table).where(*(table.c[k] == v for k, v in where.items()))
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def post(api: Api, path: str, user: User, body: Any, key: str | None = None) -> tuple[int, dict[str, Any], Any]:
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    resp = await api.client.post(path, json=body, headers=headers)
    return resp.status, await resp.json(), resp.headers


async def burst(api: Api, alice: User, bob: User) -> list[tuple[int, dict[str, Any], Any]]:
    """Five concurrent sends (two with keys): the first runs alone, the others share the next batch."""
    return await asyncio.gather(*(post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": f"m{i}"}, f"k{i}" if i % 2 else None)
                                  for i in range(5)))


@pytest.mark.parametrize("mode", ["after", "before"])
async def test_mariadb_a_cut_commit_is_checked_not_retried_blindly(proxied: Api, cutter: CommitCutter, mariadb_url: str, mode: str) -> None:
    alice, bob = await proxied.users(2)
    cutter.arm(mode)
    answers = await burst(proxied, alice, bob)
    assert cutter.cuts == 1
    assert [a[0] for a in answers] == [201] * 5, answers
    assert sorted(a[1]["content"] for a in answers) == [f"m{i}" for i in range(5)]
    assert await count(mariadb_url, messages, sender_id=alice.id) == 5  # each once: none lost, none doubled
    inbox = await proxied.call("GET", "/messages", user=bob, params={"limit": "10"}, expect=200)
    assert sorted(m["id"] for m in inbox["messages"]) == sorted(a[1]["id"] for a in answers)
    assert [m["seq"] for m in reversed(inbox["messages"])] == [1, 2, 3, 4, 5]


async def test_mariadb_when_nobody_can_tell_the_send_is_503_and_its_key_makes_the_retry_safe(
        proxied: Api, cutter: CommitCutter, mariadb_url: str) -> None:
    alice, bob = await proxied.users(2)
    body = {"recipient_ids": [bob.id], "content": "in doubt"}
    cutter.arm("after", down_after_cut=True)  # applied, the answer lost, and the database unreachable
    status, error, headers = await post(proxied, "/messages", alice, body, "doubt-1")
    assert status == 503 and error["error"]["code"] == "commit_unknown" and headers["Retry-After"] == "1"
    assert "Idempotency-Key" in error["error"]["message"]
    await cutter.restore()
    assert await count(mariadb_url, messages, sender_id=alice.id) == 1  # it was applied
    status, message, _ = await post(proxied, "/messages", alice, body, "doubt-1")
    assert status == 201 and message["content"] == "in doubt"
    assert await count(mariadb_url, messages, sender_id=alice.id) == 1  # the retry replayed it


@pytest.mark.parametrize("mode", ["after", "before"])
async def test_mariadb_a_meeting_whose_commit_was_cut_exists_once(proxied: Api, cutter: CommitCutter, mariadb_url: str, mode: str) -> None:
    alice, bob = await proxied.users(2)
    body = {"title": "cut", "participant_ids": [bob.id]}
    cutter.arm(mode, table="meetings")
    status, meeting, _ = await post(proxied, "/meetings", alice, body, "meet-cut")
    assert cutter.cuts == 1 and status == 201, meeting
    assert (await post(proxied, "/meetings", alice, body, "meet-cut"))[:2] == (201, meeting)
    assert await count(mariadb_url, meetings, organizer_id=alice.id) == 1
    assert await count(mariadb_url, messages, sender_id=alice.id) == 1  # one invitation


@pytest.mark.parametrize("mode", ["after", "before"])
@pytest.mark.parametrize("path", ["one", "list"])
async def test_mariadb_a_mark_read_whose_commit_was_cut_is_a_retryable_503(
        make_client: Any, mariadb_url: str, cutter: CommitCutter, redis_url: str, mode: str, path: str) -> None:
    """Marking read is idempotent, so a cut COMMIT is answered 503 (not a 500) whether it was
    applied or not, and the retry settles it; the reader's cached unread count is dropped
    either way, so it is never stale (with "after" the read was applied)."""
    url = make_url(mariadb_url).set(port=cutter.port).render_as_string(hide_password=False)
    api = Api(await make_client(base_config(database={"url": url}, redis={"url": redis_url, "prefix": f"t{uuid.uuid4().hex[:10]}"})))
    alice, bob = await api.users(2)
    sent = await api.send(alice, [bob])
    assert await api.unread_count(bob) == 1  # now cached
    request = ("POST", f"/messages/{sent['id']}/read", {}) if path == "one" else ("POST", "/messages/read", {"json": {"ids": [sent["id"]]}})
    cutter.arm(mode, table="message_recipients", verb="UPDATE")
    resp = await api.client.request(request[0], request[1], headers=bob.headers, **request[2])
    assert cutter.cuts == 1
    assert (resp.status, (await resp.json())["error"]["code"], resp.headers["Retry-After"]) == (503, "commit_failed", "1")
    assert await api.unread_count(bob) == (0 if mode == "after" else 1)
    again = await api.call(*request[:2], user=bob, expect=200, **request[2])
    if path == "one":
        assert again["id"] == sent["id"] and again["read_at"] is not None
    else:
        assert again == {"updated": 0 if mode == "after" else 1, "count": 0}
    assert await api.unread_count(bob) == 0
    box = await api.call("GET", "/messages?box=sent", user=alice, expect=200)
    assert box["messages"][0]["read_count"] == 1  # counted once, in the transaction that marked it


def cut_sqlite_commits(engine: Any, mode: str) -> dict[str, int]:
    """Fail the next COMMIT of a transaction that inserted messages: after really
    committing it ("after") or without ("before")."""
    state = {"armed": 1, "cuts": 0}
    sync = engine.sync_engine

    @event.listens_for(sync, "before_cursor_execute")
    def watch(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO messages "):
            conn.info["wrote"] = True

    @event.listens_for(sync, "rollback")
    def forget(conn: Any) -> None:
        conn.info.pop("wrote", None)

    @event.listens_for(sync, "commit")
    def cut(conn: Any) -> None:
        if conn.info.pop("wrote", False) and state["armed"]:
            state["armed"], state["cuts"] = 0, state["cuts"] + 1
            if mode == "after":
                conn.connection.dbapi_connection.commit()
            raise OSError("disk I/O error (injected at COMMIT)")

    return state


@pytest.mark.parametrize("mode", ["after", "before"])
async def test_sqlite_a_failed_commit_is_checked_not_retried_blindly(make_client: Any, tmp_path: Any, mode: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cut.db'}"
    api = Api(await make_client(base_config(database={"url": url})))
    alice, bob = await api.users(2)
    state = cut_sqlite_commits(api.client.app[engine_key], mode)
    answers = await burst(api, alice, bob)
    assert state["cuts"] == 1
    assert [a[0] for a in answers] == [201] * 5, answers
    assert await count(url, messages, sender_id=alice.id) == 5
    again = await post(api, "/messages", alice, {"recipient_ids": [bob.id], "content": "m1"}, "k1")
    assert again[:2] == answers[1][:2]
    assert await count(url, messages, sender_id=alice.id) == 5


async def test_mariadb_same_batch_duplicates_are_in_doubt_with_their_first(proxied: Api, cutter: CommitCutter, mariadb_url: str) -> None:
    """Three sends submitted in one tick share one batch (an unkeyed one and a keyed one
    twice): its COMMIT is applied, the answer lost and the database unreachable. The
    duplicate's answer came from the first's, so it is in doubt too: all three 503."""
    alice, bob = await proxied.users(2)
    service = proxied.client.app[message_service_key]
    once = Once("dup", "fingerprint", lambda message: Response(201, str(message["id"])))
    cutter.arm("after", down_after_cut=True)
    results = await asyncio.gather(service.send_message(alice.id, [bob.id], "plain"), service.send_message(alice.id, [bob.id], "keyed", once=once),
                                   service.send_message(alice.id, [bob.id], "keyed", once=once), return_exceptions=True)
    assert cutter.cuts == 1 and service.writer.batches == 1
    assert [getattr(r, "code", r) for r in results] == ["commit_unknown"] * 3
    await cutter.restore()
    assert await count(mariadb_url, messages, sender_id=alice.id) == 2  # applied: the plain one and the keyed one, once
    replay = await service.send_message(alice.id, [bob.id], "keyed", once=once)
    assert isinstance(replay, Response) and replay.status == 201 and not replay.new
    assert await count(mariadb_url, messages, sender_id=alice.id) == 2
