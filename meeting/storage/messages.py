"""Queries on messages and message_recipients.

Pages are keyset-paginated on message id (never OFFSET), and every "of user X"
query is a range scan of one of message_recipients' (recipient_id, ...) indexes.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import message_recipients as mr
from ..db import messages as m
from ..db import utcnow

MESSAGE_COLUMNS = (m.c.id, m.c.sender_id, m.c.type, m.c.content, m.c.meeting_id, m.c.created_at)


async def insert(conn: AsyncConnection, sender_id: int, type_: str, content: str,
                 meeting_id: int | None, recipient_ids: Sequence[int]) -> dict[str, Any]:
    """The message row, then every recipient row in one executemany round trip."""
    row = {"sender_id": sender_id, "type": type_, "content": content, "meeting_id": meeting_id, "created_at": utcnow()}
    message_id = (await conn.execute(m.insert().values(**row))).inserted_primary_key[0]
    await conn.execute(mr.insert(), [{"message_id": message_id, "recipient_id": r} for r in recipient_ids])
    return {"id": message_id, **row, "recipient_ids": list(recipient_ids)}


async def _with_recipients(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        return rows
    ids = [row["id"] for row in rows]
    found: dict[int, list[int]] = defaultdict(list)
    query = sa.select(mr.c.message_id, mr.c.recipient_id).where(mr.c.message_id.in_(ids)).order_by(mr.c.message_id, mr.c.recipient_id)
    for message_id, recipient_id in await conn.execute(query):
        found[message_id].append(recipient_id)
    for row in rows:
        row["recipient_ids"] = found[row["id"]]
    return rows


async def received(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    query = (sa.select(*MESSAGE_COLUMNS, mr.c.read_at).join(mr, mr.c.message_id == m.c.id)
             .where(mr.c.recipient_id == user_id).order_by(mr.c.message_id.desc()).limit(limit))
    if before is not None:
        query = query.where(mr.c.message_id < before)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def sent(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    query = sa.select(*MESSAGE_COLUMNS).where(m.c.sender_id == user_id).order_by(m.c.id.desc()).limit(limit)
    if before is not None:
        query = query.where(m.c.id < before)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def unread(conn: AsyncConnection, user_id: int, limit: int, after: int | None = None) -> list[dict[str, Any]]:
    """Oldest first: the order a client replays a backlog in."""
    query = (sa.select(*MESSAGE_COLUMNS, mr.c.read_at).join(mr, mr.c.message_id == m.c.id)
             .where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None)).order_by(mr.c.message_id).limit(limit))
    if after is not None:
        query = query.where(mr.c.message_id > after)
    return await _with_recipients(conn, [r._asdict() for r in await conn.execute(query)])


async def count_unread(conn: AsyncConnection, user_id: int) -> int:
    query = sa.select(sa.func.count()).select_from(mr).where(mr.c.recipient_id == user_id, mr.c.read_at.is_(None))
    return int((await conn.execute(query)).scalar_one())


async def visible(conn: AsyncConnection, user_id: int, message_id: int) -> dict[str, Any] | None:
    """The message if `user_id` sent or received it; `read_at` is the caller's own."""
    own = sa.select(mr.c.read_at).where(mr.c.message_id == m.c.id, mr.c.recipient_id == user_id).scalar_subquery()
    query = sa.select(*MESSAGE_COLUMNS, own.label("read_at")).where(
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
