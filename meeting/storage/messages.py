"""Queries on messages and message_recipients.

Pages are keyset-paginated on message id (never OFFSET), and every "of user X"
query is a range scan of one of message_recipients' (recipient_id, ...) indexes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import message_recipients as mr
from ..db import messages as m
from ..db import users, utcnow
from . import attach_ids

MESSAGE_COLUMNS = (m.c.id, m.c.sender_id, m.c.type, m.c.content, m.c.meeting_id, m.c.created_at)
RECEIVED_COLUMNS = (*MESSAGE_COLUMNS, mr.c.read_at, mr.c.seq)


async def allocate_seqs(conn: AsyncConnection, sender_id: int, recipient_ids: Sequence[int]) -> dict[int, int]:
    """Next `seq` of every recipient that exists, under the users rows' locks.

    One UPDATE locks sender and recipients in ascending id order (the sender with
    +0): every send takes its locks in the same global order, so concurrent sends
    cannot deadlock, including on the foreign-key locks the inserts take on the
    sender's row. The locks are held to commit, so for each recipient commit
    order is seq order, and a rollback leaves no hole.
    """
    ids = sorted({sender_id, *recipient_ids})
    bump = sa.case((users.c.id.in_(list(recipient_ids)), 1), else_=0)
    await conn.execute(users.update().where(users.c.id.in_(ids)).values(last_seq=users.c.last_seq + bump))
    rows = await conn.execute(sa.select(users.c.id, users.c.last_seq).where(users.c.id.in_(list(recipient_ids))))
    return {user_id: seq for user_id, seq in rows}


async def insert(conn: AsyncConnection, sender_id: int, type_: str, content: str,
                 meeting_id: int | None, seqs: dict[int, int]) -> dict[str, Any]:
    """The message row, then every recipient row (with its seq) in one executemany round trip."""
    row = {"sender_id": sender_id, "type": type_, "content": content, "meeting_id": meeting_id, "created_at": utcnow()}
    message_id = (await conn.execute(m.insert().values(**row))).inserted_primary_key[0]
    await conn.execute(mr.insert(), [{"message_id": message_id, "recipient_id": r, "seq": s} for r, s in sorted(seqs.items())])
    return {"id": message_id, **row, "recipient_ids": sorted(seqs), "seqs": seqs}


async def last_seq(conn: AsyncConnection, user_id: int) -> int:
    """The user's last committed seq: every row up to it is visible once this is read."""
    return int((await conn.execute(sa.select(users.c.last_seq).where(users.c.id == user_id))).scalar_one_or_none() or 0)


async def received_after_seq(conn: AsyncConnection, user_id: int, after: int, limit: int) -> list[dict[str, Any]]:
    """Everything the user received after `after`, in seq order (read or not)."""
    query = (sa.select(*RECEIVED_COLUMNS).join(mr, mr.c.message_id == m.c.id)
             .where(mr.c.recipient_id == user_id, mr.c.seq > after).order_by(mr.c.seq).limit(limit))
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def _with_recipients(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return await attach_ids(conn, rows, mr.c.message_id, mr.c.recipient_id, "recipient_ids")


async def received(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    query = (sa.select(*RECEIVED_COLUMNS).join(mr, mr.c.message_id == m.c.id)
             .where(mr.c.recipient_id == user_id).order_by(mr.c.message_id.desc()).limit(limit))
    if before is not None:
        query = query.where(mr.c.message_id < before)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def sent(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    query = sa.select(*MESSAGE_COLUMNS).where(m.c.sender_id == user_id).order_by(m.c.id.desc()).limit(limit)
    if before is not None:
        query = query.where(m.c.id < before)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def unread(conn: AsyncConnection, user_id: int, limit: int, after_seq: int | None = None,
                 upto_seq: int | None = None) -> list[dict[str, Any]]:
    """In seq order (oldest first): the order a client replays a backlog in."""
    query = (sa.select(*RECEIVED_COLUMNS).join(mr, mr.c.message_id == m.c.id)
             .where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None)).order_by(mr.c.seq).limit(limit))
    if after_seq is not None:
        query = query.where(mr.c.seq > after_seq)
    if upto_seq is not None:
        query = query.where(mr.c.seq <= upto_seq)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def count_unread(conn: AsyncConnection, user_id: int) -> int:
    query = sa.select(sa.func.count()).select_from(mr).where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None))
    return int((await conn.execute(query)).scalar_one())


async def visible(conn: AsyncConnection, user_id: int, message_id: int) -> dict[str, Any] | None:
    """The message if `user_id` sent or received it; `read_at` is the caller's own."""
    mine = sa.and_(mr.c.message_id == m.c.id, mr.c.recipient_id == user_id)
    own_read_at = sa.select(mr.c.read_at).where(mine).scalar_subquery()
    own_seq = sa.select(mr.c.seq).where(mine).scalar_subquery()
    query = sa.select(*MESSAGE_COLUMNS, own_read_at.label("read_at"), own_seq.label("seq")).where(
        m.c.id == message_id,
        sa.or_(m.c.sender_id == user_id, sa.exists().where(mr.c.message_id == m.c.id, mr.c.recipient_id == user_id)),
    )
    row = (await conn.execute(query)).first()
    if row is None:
        return None
    return (await _with_recipients(conn, [row._asdict()]))[0]


async def mark_read(conn: AsyncConnection, user_id: int, ids: Iterable[int] | None) -> tuple[list[int], dt.datetime]:
    """Mark the user's unread messages among `ids` (all of them for None) read.

    Returns the ids that changed from unread to read, so that every device can be told.
    """
    now = utcnow()
    where = [mr.c.recipient_id == user_id, mr.c.read_at.is_(None)]
    if ids is not None:
        ids = list(ids)
        if not ids:
            return [], now
        where.append(mr.c.message_id.in_(ids))
    changed = list((await conn.execute(sa.select(mr.c.message_id).where(*where).order_by(mr.c.message_id))).scalars())
    if changed:
        await conn.execute(mr.update().where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None),
                                             mr.c.message_id.in_(changed)).values(read_at=now))
    return changed, now


async def read_at(conn: AsyncConnection, user_id: int, message_id: int) -> tuple[bool, dt.datetime | None]:
    """(is the user a recipient, when they read it)."""
    row = (await conn.execute(sa.select(mr.c.read_at).where(mr.c.message_id == message_id, mr.c.recipient_id == user_id))).first()
    return (row is not None, row.read_at if row else None)


async def received_among(conn: AsyncConnection, user_id: int, ids: Iterable[int]) -> set[int]:
    """Which of `ids` the user received."""
    query = sa.select(mr.c.message_id).where(mr.c.recipient_id == user_id, mr.c.message_id.in_(list(ids)))
    return set((await conn.execute(query)).scalars())
