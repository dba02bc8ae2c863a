"""Queries on messages and message_recipients.

Pages are keyset-paginated on message id (never OFFSET), and every "of user X"
query is a range scan of one of message_recipients' (recipient_id, ...) indexes.
Rows come without their recipient ids: a recipient sees only `recipient_count`
(a column), and for the sender's view the MessageService attaches the ids from
its in-process lists (meeting.recipients), reading here only what it lacks.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import message_recipients as mr
from ..db import messages as m
from ..db import users, utcnow
from . import attach_ids, driver
from .packets import Packets

MESSAGE_COLUMNS = (m.c.id, m.c.sender_id, m.c.type, m.c.content, m.c.meeting_id, m.c.created_at, m.c.recipient_count)
RECEIVED_COLUMNS = (*MESSAGE_COLUMNS, mr.c.read_at, mr.c.seq)
SENT_COLUMNS = (*MESSAGE_COLUMNS, m.c.read_count)

# The send path's statements, built once: building a statement costs about as
# much as executing it (SQLAlchemy still caches the compiled form either way). On
# MariaDB their twins in meeting.storage.driver run instead, past SQLAlchemy.
_IDS = sa.bindparam("ids", expanding=True)
#: Ids per locking statement. MariaDB turns an IN list of 1000 or more values into a
#: join with a temporary table, which can scan (and lock) users outside the list.
_LOCK_CHUNK = 500
_LOCK_USERS = sa.select(users.c.id, users.c.last_seq).where(users.c.id.in_(_IDS)).order_by(users.c.id).with_for_update()
_BUMP_SEQS = users.update().where(users.c.id.in_(_IDS)).values(last_seq=users.c.last_seq + sa.bindparam("step"))
_INSERT_MESSAGE = m.insert()
_INSERT_MESSAGES = m.insert().returning(m.c.id, sort_by_parameter_order=True)
_INSERT_RECIPIENTS = mr.insert()


@dataclass(frozen=True)
class Draft:
    """A validated message not stored yet; `recipient_ids` sorted and distinct."""
    sender_id: int
    recipient_ids: tuple[int, ...]
    content: str
    type: str
    meeting_id: int | None = None


class UnknownUsers(Exception):
    """A packed batch named a user that does not exist (its seq bump was a wrong bet): it is
    rolled back whole, and runs again unpacked, which answers those drafts one by one."""


async def insert_many(conn: AsyncConnection, drafts: Sequence[Draft],
                      packets: Packets | None = None) -> list[dict[str, Any] | list[int]]:
    """Store the drafts, in order, in a fixed number of statements however many there are.

    Answers per draft: the stored message, or the ids among sender and recipients
    that do not exist (that draft is skipped and takes no seq). The users rows of every sender and
    recipient are locked first (`lock_users`), and the locks are held to commit, so for
    each recipient commit order is seq order and a rollback leaves no hole. With `packets`
    (MariaDB's group commit), see `_insert_packed`.
    """
    if packets is not None:
        return await _insert_packed(packets, drafts)
    last_seq = await lock_users(conn, {d.sender_id for d in drafts}.union(*(d.recipient_ids for d in drafts)))
    now = utcnow()
    answers, bumped = _assign(drafts, last_seq, now)
    stored = [a for a in answers if isinstance(a, dict)]
    if not stored:
        return answers
    await _bump_seqs(conn, bumped)
    rows = [{k: a[k] for k in driver.MESSAGE_FIELDS} for a in stored]  # both paths insert these
    for message, message_id in zip(stored, await _insert_messages(conn, rows)):
        message["id"] = message_id
    recipient_rows = [(a["id"], r, s) for a in stored for r, s in a["seqs"].items()]
    if driver.available(conn):
        await driver.insert_recipients(conn, recipient_rows)
    else:
        await conn.execute(_INSERT_RECIPIENTS, [{"message_id": m, "recipient_id": r, "seq": s} for m, r, s in recipient_rows])
    return answers


async def _insert_packed(packets: Packets, drafts: Sequence[Draft]) -> list[dict[str, Any] | list[int]]:
    """The same statements in one packet (meeting.storage.packets), betting that every user
    exists: the lock, the bump computed from the drafts, the messages insert; the recipients
    rows go with the COMMIT. The lock's rows are read before the bump ran. A lost bet
    (a user missing from them, whatever else failed) raises UnknownUsers."""
    now = utcnow()
    ids = sorted({d.sender_id for d in drafts}.union(*(d.recipient_ids for d in drafts)))
    locks = [driver.lock_statement(ids[start:start + _LOCK_CHUNK]) for start in range(0, len(ids), _LOCK_CHUNK)]
    bumped = _steps(Counter(r for d in drafts for r in d.recipient_ids))
    rows = [_row(d, now) for d in drafts]
    sent = await packets.send([*locks, *(driver.bump_statement(step, users) for step, users in bumped),
                               driver.insert_messages_statement(rows)])
    if len(sent.rows) >= len(locks):
        last_seq = {user_id: seq for chunk in sent.rows[:len(locks)] for user_id, seq in chunk}
        if len(last_seq) != len(ids):
            raise UnknownUsers(sorted(set(ids) - set(last_seq)))
    if sent.error is not None:
        raise sent.error
    answers, _ = _assign(drafts, last_seq, now)
    message_ids = [message_id for (message_id,) in sent.rows[-1]]
    assert len(message_ids) == len(answers)
    for message, message_id in zip(answers, message_ids):
        message["id"] = message_id  # type: ignore[index]
    for statement in driver.insert_recipients_statements([(a["id"], r, s) for a in answers for r, s in a["seqs"].items()]):  # type: ignore[union-attr]
        packets.defer(statement)
    return answers


def _row(draft: Draft, now: dt.datetime) -> dict[str, Any]:
    return {"sender_id": draft.sender_id, "type": draft.type, "content": draft.content, "meeting_id": draft.meeting_id,
            "created_at": now, "recipient_count": len(draft.recipient_ids)}


def _assign(drafts: Sequence[Draft], last_seq: dict[int, int],
            now: dt.datetime) -> tuple[list[dict[str, Any] | list[int]], dict[int, int]]:
    """Each draft's message with its recipients' next seqs (`last_seq` is advanced), or its
    unknown users; and how far each recipient's seq went."""
    bumped: dict[int, int] = defaultdict(int)
    answers: list[dict[str, Any] | list[int]] = []
    for draft in drafts:
        unknown = [u for u in {draft.sender_id, *draft.recipient_ids} if u not in last_seq]
        if unknown:
            answers.append(unknown)
            continue
        seqs = {}
        for r in draft.recipient_ids:
            last_seq[r] += 1
            bumped[r] += 1
            seqs[r] = last_seq[r]
        answers.append({"sender_id": draft.sender_id, "type": draft.type, "content": draft.content,
                        "meeting_id": draft.meeting_id, "created_at": now, "recipient_ids": list(draft.recipient_ids),
                        "recipient_count": len(draft.recipient_ids), "read_count": 0, "seqs": seqs})
    return answers, bumped


def _steps(bumped: dict[int, int]) -> list[tuple[int, list[int]]]:
    """One UPDATE per distinct increment (nearly always one: +1 for everybody), ids ascending."""
    by_step: dict[int, list[int]] = defaultdict(list)
    for user_id, step in bumped.items():
        by_step[step].append(user_id)
    return [(step, sorted(ids)) for step, ids in sorted(by_step.items())]


async def lock_users(conn: AsyncConnection, user_ids: Iterable[int]) -> dict[int, int]:
    """Lock these users' rows to commit, in ascending id order: every transaction that
    writes rows pointing at users (a send, a meeting with its participants) calls this
    before its first insert, so all of them lock in one global order. An insert first
    would take shared foreign-key locks that the later FOR UPDATE must upgrade, and two
    such transactions deadlock. Answers each existing user's last seq."""
    ids = sorted(set(user_ids))
    locked: dict[int, int] = {}
    for start in range(0, len(ids), _LOCK_CHUNK):
        chunk = ids[start:start + _LOCK_CHUNK]
        rows = await (driver.lock_users(conn, chunk) if driver.available(conn) else conn.execute(_LOCK_USERS, {"ids": chunk}))
        locked.update((user_id, seq) for user_id, seq in rows)
    return locked


async def _bump_seqs(conn: AsyncConnection, bumped: dict[int, int]) -> None:
    for step, ids in _steps(bumped):
        if driver.available(conn):
            await driver.bump_seqs(conn, step, ids)
        else:
            await conn.execute(_BUMP_SEQS, {"ids": ids, "step": step})


async def _insert_messages(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
    """Their ids, in order: one multi-row INSERT ... RETURNING where the database has it
    (SQLite, MariaDB >= 10.5), one INSERT per row elsewhere (MySQL)."""
    if conn.dialect.insert_executemany_returning_sort_by_parameter_order and driver.available(conn):
        return await driver.insert_messages(conn, rows)
    if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        return list((await conn.execute(_INSERT_MESSAGES, rows)).scalars())
    return [(await conn.execute(_INSERT_MESSAGE, row)).inserted_primary_key[0] for row in rows]


async def last_seq(conn: AsyncConnection, user_id: int) -> int:
    """The user's last committed seq: every row up to it is visible once this is read."""
    return int((await conn.execute(_LAST_SEQ, {"user_id": user_id})).scalar_one_or_none() or 0)


async def sync_points(conn: AsyncConnection, user_ids: list[int], page: int) -> dict[int, tuple[int, int, list[dict[str, Any]]]]:
    """Where each of these users' new devices start: the last committed seq, the unread
    count up to it, and the first `page` of those unread messages in seq order; for many
    users in one statement (one round trip, and one read view: each count is exactly that
    of the rows up to its seq). Users that do not exist are left out.

    Each user's page is its own branch, `ORDER BY seq LIMIT page`, a range scan of the
    (recipient_id, seq) index like the one-user `unread`: a window over all of a batch's unread rows instead had the
    database sort every one of them (20 s for 500 users x 2,000 unread, against 4.5 s for
    one statement per user). The caller bounds len(user_ids) x page (the rows read)."""
    if not user_ids:
        return {}
    params: dict[str, Any] = {f"u{i}": user_id for i, user_id in enumerate(user_ids)}
    params["page"] = page
    points: dict[int, tuple[int, int, list[dict[str, Any]]]] = {}
    pages: list[dict[str, Any]] = []
    statement = _sync_points_statement(len(user_ids), page > 0, conn.dialect.name == "sqlite")
    for row in await conn.execute(statement, params):
        message = row._asdict()
        user_id, last, count = message.pop("user_id"), message.pop("last_seq"), message.pop("unread")
        if message["id"] is None:
            points[int(user_id)] = (int(last or 0), int(count or 0), [])
        else:
            message["_user"] = int(user_id)
            pages.append(message)
    for message in pages:  # branches come in no promised order; each page is then sorted by seq
        point = points.get(message.pop("_user"))
        if point is not None:
            point[2].append(message)
    for _, _, rows in points.values():
        rows.sort(key=lambda r: r["seq"])
    return points


async def received_after_seq(conn: AsyncConnection, user_id: int, after: int, limit: int) -> list[dict[str, Any]]:
    """Everything the user received after `after`, in seq order (read or not)."""
    return _dicts(await conn.execute(_RECEIVED_AFTER_SEQ, {"user_id": user_id, "after": after, "limit": limit}))


async def recipient_lists(conn: AsyncConnection, message_ids: list[int]) -> dict[int, list[int]]:
    """Each message's sorted recipient ids, in one query."""
    rows = await attach_ids(conn, [{"id": i} for i in message_ids], mr.c.message_id, mr.c.recipient_id, "recipient_ids")
    return {row["id"]: row["recipient_ids"] for row in rows}


async def received(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    params = {"user_id": user_id, "before": _NO_BOUND if before is None else before, "limit": limit}
    return _dicts(await conn.execute(_RECEIVED, params))


async def sent(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    params = {"user_id": user_id, "before": _NO_BOUND if before is None else before, "limit": limit}
    return _dicts(await conn.execute(_SENT, params))


async def unread(conn: AsyncConnection, user_id: int, limit: int, after_seq: int | None = None,
                 upto_seq: int | None = None) -> list[dict[str, Any]]:
    """In seq order (oldest first): the order a client replays a backlog in."""
    params = {"user_id": user_id, "after": after_seq or 0, "upto": _NO_BOUND if upto_seq is None else upto_seq, "limit": limit}
    return _dicts(await conn.execute(_UNREAD, params))


async def count_unread(conn: AsyncConnection, user_id: int, upto_seq: int | None = None) -> int:
    params = {"user_id": user_id, "upto": _NO_BOUND if upto_seq is None else upto_seq}
    return int((await conn.execute(_COUNT_UNREAD, params)).scalar_one())


def _dicts(result: Any) -> list[dict[str, Any]]:
    return [r._asdict() for r in result]


# The read path's statements, built once like the send path's. Optional bounds
# are always present, open when not given (seqs start at 1, ids below 2**63), so
# each query is one statement whatever the caller passes.
_NO_BOUND = 2**63 - 1
_USER, _LIMIT = sa.bindparam("user_id"), sa.bindparam("limit")
_RECEIVED_BY = sa.select(*RECEIVED_COLUMNS).join(mr, mr.c.message_id == m.c.id).where(mr.c.recipient_id == _USER)
_LAST_SEQ = sa.select(users.c.last_seq).where(users.c.id == _USER)
_RECEIVED_AFTER_SEQ = _RECEIVED_BY.where(mr.c.seq > sa.bindparam("after")).order_by(mr.c.seq).limit(_LIMIT)
_RECEIVED = _RECEIVED_BY.where(mr.c.message_id < sa.bindparam("before")).order_by(mr.c.message_id.desc()).limit(_LIMIT)
_SENT = (sa.select(*SENT_COLUMNS).where(m.c.sender_id == _USER, m.c.id < sa.bindparam("before"))
         .order_by(m.c.id.desc()).limit(_LIMIT))
_UNREAD = (_RECEIVED_BY.where(mr.c.read_at.is_(None), mr.c.seq > sa.bindparam("after"), mr.c.seq <= sa.bindparam("upto"))
           .order_by(mr.c.seq).limit(_LIMIT))
_COUNT_UNREAD = (sa.select(sa.func.count()).select_from(mr)
                 .where(mr.c.recipient_id == _USER, mr.c.read_at.is_(None), mr.c.seq <= sa.bindparam("upto")))


@functools.lru_cache(maxsize=128)
def _sync_points_statement(users_count: int, with_pages: bool, derived: bool) -> sa.CompoundSelect | sa.Select:
    """One head row per user (last seq, unread count up to it; message columns NULL), then
    per user a branch with its first `page` unread rows up to that seq. The users row is
    read by each branch, in the one statement's read view, so all agree. Built once per
    batch size (the bind names are u0, u1, ...).

    A LIMITed branch is a parenthesised UNION ALL member where the database allows one
    (MariaDB; MySQL too, untested) and a derived table where it does not (`derived`:
    SQLite). MariaDB materialises every such derived table as a temporary table, rows or
    not: 0.25-0.34 ms of its CPU per user per statement against 0.02-0.04 for a
    parenthesised branch (docs/performance.md, "Connect storm, round 4"), which made the
    sync point most of a connect's database cost."""
    ids = [sa.bindparam(f"u{i}") for i in range(users_count)]
    unread = (sa.select(sa.func.count()).select_from(mr)
              .where(mr.c.recipient_id == users.c.id, mr.c.read_at.is_(None), mr.c.seq <= users.c.last_seq)
              .scalar_subquery())
    nulls = [sa.type_coerce(sa.null(), c.type).label(c.name) for c in (*MESSAGE_COLUMNS, mr.c.read_at, mr.c.seq)]
    head = sa.select(users.c.id.label("user_id"), users.c.last_seq, unread.label("unread"), *nulls).where(users.c.id.in_(ids))
    if not with_pages:
        return head
    branches = []
    for i, user in enumerate(ids):
        last = sa.select(users.c.last_seq).where(users.c.id == user).scalar_subquery()
        rows = (sa.select(mr.c.recipient_id.label("user_id"), sa.type_coerce(sa.null(), users.c.last_seq.type).label("last_seq"),
                          sa.type_coerce(sa.null(), sa.Integer()).label("unread"), *MESSAGE_COLUMNS, mr.c.read_at, mr.c.seq)
                .join(m, m.c.id == mr.c.message_id)
                .where(mr.c.recipient_id == user, mr.c.read_at.is_(None), mr.c.seq <= last)
                .order_by(mr.c.seq).limit(sa.bindparam("page")))
        if derived:
            rows = sa.select(*rows.subquery(f"p{i}").c)
        branches.append(rows)
    return sa.union_all(head, *branches)


async def visible(conn: AsyncConnection, user_id: int, message_id: int) -> dict[str, Any] | None:
    """The message if `user_id` sent or received it; `read_at` is the caller's own."""
    mine = sa.and_(mr.c.message_id == m.c.id, mr.c.recipient_id == user_id)
    own_read_at = sa.select(mr.c.read_at).where(mine).scalar_subquery()
    own_seq = sa.select(mr.c.seq).where(mine).scalar_subquery()
    query = sa.select(*SENT_COLUMNS, own_read_at.label("read_at"), own_seq.label("seq")).where(
        m.c.id == message_id,
        sa.or_(m.c.sender_id == user_id, sa.exists().where(mr.c.message_id == m.c.id, mr.c.recipient_id == user_id)),
    )
    row = (await conn.execute(query)).first()
    return None if row is None else row._asdict()


async def mark_read(conn: AsyncConnection, user_id: int, ids: Iterable[int] | None) -> tuple[list[int], dt.datetime, int]:
    """Mark the user's unread messages among `ids` (all of them for None) read.

    Returns the ids that changed from unread to read, so that every device can be told,
    and the highest of the user's seqs among them (0 if none changed): a device must not
    hear of the read before it had that message.
    """
    now = utcnow()
    where = [mr.c.recipient_id == user_id, mr.c.read_at.is_(None)]
    if ids is not None:
        ids = list(ids)
        if not ids:
            return [], now, 0
        where.append(mr.c.message_id.in_(ids))
    # FOR UPDATE: two marks of the same row (two devices, REST and WebSocket) must not
    # both see it unread, or both would count it in messages.read_count (`count_reads`).
    # The second waits, then reads the committed row (InnoDB's locking reads see the
    # latest version): read. SQLite has no FOR UPDATE; its writers are serialised anyway.
    select = sa.select(mr.c.message_id, mr.c.seq).where(*where).order_by(mr.c.message_id).with_for_update()
    rows = (await conn.execute(select)).all()
    changed = [row.message_id for row in rows]
    if changed:
        await conn.execute(mr.update().where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None),
                                             mr.c.message_id.in_(changed)).values(read_at=now))
    return changed, now, max((row.seq for row in rows), default=0)


async def read_at(conn: AsyncConnection, user_id: int, message_id: int) -> tuple[bool, dt.datetime | None]:
    """(is the user a recipient, when they read it)."""
    row = (await conn.execute(sa.select(mr.c.read_at).where(mr.c.message_id == message_id, mr.c.recipient_id == user_id))).first()
    return (row is not None, row.read_at if row else None)


async def received_among(conn: AsyncConnection, user_id: int, ids: Iterable[int]) -> set[int]:
    """Which of `ids` the user received."""
    query = sa.select(mr.c.message_id).where(mr.c.recipient_id == user_id, mr.c.message_id.in_(list(ids)))
    return set((await conn.execute(query)).scalars())

