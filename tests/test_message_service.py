"""MessageService's contract with its listeners (what real-time push plugs into)."""

from typing import Any

import sqlalchemy as sa

from meeting.db import messages
from meeting.typedefs import engine_key, message_service_key
from tests.helpers import Api


async def test_listeners_run_after_commit_and_never_for_a_failed_send(api: Api) -> None:
    service = api.client.app[message_service_key]
    engine = api.client.app[engine_key]
    stored: list[dict[str, Any]] = []
    reads: list[tuple[int, list[int], int, int]] = []

    async def on_stored(message: dict[str, Any]) -> None:
        async with engine.connect() as conn:  # a separate connection sees the row: it is committed
            committed = (await conn.execute(sa.select(messages.c.id).where(messages.c.id == message["id"]))).scalar()
        stored.append({**message, "committed": committed == message["id"]})

    async def on_read(user_id: int, ids: list[int], count: int, upto_seq: int) -> None:
        reads.append((user_id, ids, count, upto_seq))

    service.on_stored.append(on_stored)
    service.on_read.append(on_read)
    alice, bob, carol = await api.users(3)
    sent = await api.send(alice, [carol, bob])
    await api.call("POST", "/messages", user=alice, json={"recipient_ids": [bob.id, 424242], "content": "x"}, expect=422)
    assert [(m["id"], m["recipient_ids"], m["committed"]) for m in stored] == [(sent["id"], sorted([bob.id, carol.id]), True)]
    again = await api.send(alice, [bob])  # not sent["id"] + 1 on MariaDB: the refused send's rolled-back insert took one
    assert again["id"] > sent["id"]
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)
    await api.call("POST", "/messages/read", user=bob, json={"all": True}, expect=200)  # nothing changed: no event
    assert reads == [(bob.id, [sent["id"], again["id"]], 0, 2)]  # bob's seq 2 is the newest read


async def test_a_failing_listener_does_not_fail_the_send(api: Api) -> None:
    async def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    api.client.app[message_service_key].on_stored.append(broken)
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    assert await api.unread_count(bob) == 1
