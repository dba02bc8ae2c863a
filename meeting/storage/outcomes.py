"""Whether a transaction whose COMMIT failed (connection lost, server killed) was applied.

Each check looks for a row only that transaction inserted (its id with its own
created_at, to the microsecond, and author) with a locking read: if the
transaction is still open or committing on the server, the read waits for its
outcome instead of seeing "not there yet".
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import meetings, messages


async def message_committed(conn: AsyncConnection, message_id: int, sender_id: int, created_at: dt.datetime) -> bool:
    """Whether the row a transaction inserted is there. A locking read: if that
    transaction is still open or committing on the server, this waits for its outcome."""
    query = (sa.select(messages.c.id).where(messages.c.id == message_id, messages.c.sender_id == sender_id,
                                            messages.c.created_at == created_at).with_for_update(read=True))
    return (await conn.execute(query)).first() is not None


async def meeting_committed(conn: AsyncConnection, meeting_id: int, organizer_id: int, created_at: dt.datetime) -> bool:
    """As `message_committed`, for a meeting row."""
    query = (sa.select(meetings.c.id).where(meetings.c.id == meeting_id, meetings.c.organizer_id == organizer_id,
                                            meetings.c.created_at == created_at).with_for_update(read=True))
    return (await conn.execute(query)).first() is not None
