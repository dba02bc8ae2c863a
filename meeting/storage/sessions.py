"""Queries on auth_sessions and refresh_tokens."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import auth_sessions as s
from ..db import refresh_tokens as rt
from ..db import users, utcnow


async def create(conn: AsyncConnection, user_id: int) -> int:
    result = await conn.execute(s.insert().values(user_id=user_id, created_at=utcnow()))
    return int(result.inserted_primary_key[0])


async def add_refresh_token(conn: AsyncConnection, session_id: int, token_hash: str, expires_at: dt.datetime) -> None:
    await conn.execute(rt.insert().values(token_hash=token_hash, session_id=session_id, created_at=utcnow(), expires_at=expires_at))


async def refresh_token_for_update(conn: AsyncConnection, token_hash: str) -> dict[str, Any] | None:
    """The token with its session, both rows locked: two refreshes racing with one token
    must not both succeed."""
    query = (sa.select(rt.c.session_id, rt.c.expires_at, rt.c.used_at, s.c.user_id, s.c.revoked_at)
             .join(s, s.c.id == rt.c.session_id).where(rt.c.token_hash == token_hash).with_for_update())
    row = (await conn.execute(query)).first()
    return row._asdict() if row else None


async def mark_used(conn: AsyncConnection, token_hash: str) -> None:
    await conn.execute(rt.update().where(rt.c.token_hash == token_hash).values(used_at=utcnow()))


async def revoke(conn: AsyncConnection, session_id: int) -> None:
    await conn.execute(s.update().where(s.c.id == session_id, s.c.revoked_at.is_(None)).values(revoked_at=utcnow()))


async def revoke_all(conn: AsyncConnection, user_id: int) -> list[int]:
    """Every live session of the user; answers their ids."""
    ids = list((await conn.execute(sa.select(s.c.id).where(s.c.user_id == user_id, s.c.revoked_at.is_(None)))).scalars())
    if ids:
        await conn.execute(s.update().where(s.c.id.in_(ids)).values(revoked_at=utcnow()))
    return ids


# Built once: every first request of a session asks this, and building a select
# costs about as much as running it.
_IS_LIVE = (sa.select(s.c.id).join(users, users.c.id == s.c.user_id)
            .where(s.c.id == sa.bindparam("session_id"), s.c.user_id == sa.bindparam("user_id"), s.c.revoked_at.is_(None)))


async def is_live(conn: AsyncConnection, session_id: int, user_id: int) -> bool:
    """The session exists, belongs to that user (who exists), and is not revoked."""
    return (await conn.execute(_IS_LIVE, {"session_id": session_id, "user_id": user_id})).first() is not None


async def revoked_since(conn: AsyncConnection, since: dt.datetime) -> list[tuple[int, int, dt.datetime]]:
    """(session id, user id, revoked_at) of sessions revoked at or after `since`, oldest first."""
    query = (sa.select(s.c.id, s.c.user_id, s.c.revoked_at).where(s.c.revoked_at >= since).order_by(s.c.revoked_at))
    return [(r.id, r.user_id, r.revoked_at) for r in await conn.execute(query)]


async def prune(conn: AsyncConnection, before: dt.datetime) -> None:
    """Refresh tokens that expired before `before`, and sessions left with none that ended
    (revoked, or all of their tokens expired) before it."""
    await conn.execute(rt.delete().where(rt.c.expires_at < before))
    has_tokens = sa.exists().where(rt.c.session_id == s.c.id)
    await conn.execute(s.delete().where(~has_tokens, sa.or_(s.c.revoked_at < before, s.c.created_at < before)))
