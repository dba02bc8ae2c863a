"""Queries on meetings and meeting_participants."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import meeting_participants as mp
from ..db import meetings as mt
from ..db import utcnow
from . import attach_ids

COLUMNS = (mt.c.id, mt.c.title, mt.c.organizer_id, mt.c.starts_at, mt.c.created_at)


async def insert(conn: AsyncConnection, title: str, organizer_id: int, starts_at: dt.datetime | None,
                 participant_ids: list[int]) -> dict[str, Any]:
    row = {"title": title, "organizer_id": organizer_id, "starts_at": starts_at, "created_at": utcnow()}
    meeting_id = (await conn.execute(mt.insert().values(**row))).inserted_primary_key[0]
    await conn.execute(mp.insert(), [{"meeting_id": meeting_id, "user_id": u} for u in participant_ids])
    return {"id": meeting_id, **row, "participant_ids": participant_ids}


async def _with_participants(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return await attach_ids(conn, rows, mp.c.meeting_id, mp.c.user_id, "participant_ids")


async def of_user(conn: AsyncConnection, user_id: int, limit: int, before: int | None) -> list[dict[str, Any]]:
    query = (sa.select(*COLUMNS).join(mp, mp.c.meeting_id == mt.c.id).where(mp.c.user_id == user_id)
             .order_by(mt.c.id.desc()).limit(limit))
    if before is not None:
        query = query.where(mt.c.id < before)
    return await _with_participants(conn, [r._asdict() for r in await conn.execute(query)])


async def visible(conn: AsyncConnection, user_id: int, meeting_id: int) -> dict[str, Any] | None:
    query = sa.select(*COLUMNS).join(mp, mp.c.meeting_id == mt.c.id).where(mt.c.id == meeting_id, mp.c.user_id == user_id)
    row = (await conn.execute(query)).first()
    return (await _with_participants(conn, [row._asdict()]))[0] if row else None


async def participants_among(conn: AsyncConnection, meeting_id: int, user_ids: Iterable[int]) -> set[int]:
    query = sa.select(mp.c.user_id).where(mp.c.meeting_id == meeting_id, mp.c.user_id.in_(list(user_ids)))
    return set((await conn.execute(query)).scalars())
