"""Recipient lists kept in-process: bounded, least recently used out, read from the database when missing."""

from __future__ import annotations

from meeting.recipients import RecipientLists
from meeting.typedefs import message_service_key
from tests.helpers import Api


class Db:
    """Stands for the database: answers lists and counts how it was asked."""

    def __init__(self, lists: dict[int, list[int]]):
        self.lists = lists
        self.asked: list[list[int]] = []

    async def fetch(self, ids: list[int]) -> dict[int, list[int]]:
        self.asked.append(list(ids))
        return {i: self.lists[i] for i in ids if i in self.lists}


async def test_misses_are_fetched_once_together_then_served_from_memory() -> None:
    db = Db({1: [5, 6], 2: [7], 3: [5]})
    lists = RecipientLists()
    lists.remember(2, [7])
    rows = await lists.attach([{"id": 1}, {"id": 2}, {"id": 3}], db.fetch)
    assert [r["recipient_ids"] for r in rows] == [(5, 6), (7,), (5,)]
    assert db.asked == [[1, 3]] and (lists.hits, lists.misses) == (1, 2)
    await lists.attach([{"id": 3}, {"id": 1}], db.fetch)
    assert db.asked == [[1, 3]] and lists.hits == 3


async def test_bounded_by_ids_kept_least_recently_used_out() -> None:
    db = Db({1: [1, 2], 2: [3, 4], 3: [5, 6]})
    lists = RecipientLists(max_ids=4)
    lists.remember(1, [1, 2])
    lists.remember(2, [3, 4])
    await lists.attach([{"id": 1}], db.fetch)  # 1 is now the most recently used
    lists.remember(3, [5, 6])                   # so 2 goes
    await lists.attach([{"id": 1}, {"id": 3}], db.fetch)
    assert db.asked == []
    rows = await lists.attach([{"id": 2}], db.fetch)
    assert rows[0]["recipient_ids"] == (3, 4) and db.asked == [[2]]
    lists.remember(9, list(range(10)))  # larger than the bound: not kept, nothing evicted for it
    assert (await lists.attach([{"id": 9}], Db({9: [0]}).fetch))[0]["recipient_ids"] == (0,)


async def test_another_instance_reads_the_lists_from_the_database(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    sent = await api.send(alice, [bob, carol])
    service = api.client.app[message_service_key]
    service.recipients = RecipientLists()  # as on an instance that did not store the message
    for path in ("/messages?box=sent", "/messages/sent", f"/messages/{sent['id']}"):  # the sender's views
        body = await api.call("GET", path, user=alice, expect=200)
        message = body["messages"][0] if "messages" in body else body
        assert message["recipient_ids"] == sorted([bob.id, carol.id])
    assert service.recipients.misses == 1 and service.recipients.hits == 2
    for user, path in ((bob, "/messages"), (carol, "/messages/unread"), (bob, f"/messages/{sent['id']}")):
        body = await api.call("GET", path, user=user, expect=200)  # a recipient's: no lists needed at all
        message = body["messages"][0] if "messages" in body else body
        assert "recipient_ids" not in message and message["recipient_count"] == 2
    assert service.recipients.misses == 1 and service.recipients.hits == 2
