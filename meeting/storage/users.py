"""Queries on the users table."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import users, utcnow

PUBLIC_COLUMNS = (users.c.id, users.c.username, users.c.display_name, users.c.created_at)


class UsernameTaken(Exception):
    pass


async def insert(conn: AsyncConnection, username: str, display_name: str, password_hash: str) -> dict[str, Any]:
    row = {"username": username, "display_name": display_name, "password_hash": password_hash, "created_at": utcnow()}
    try:
        result = await conn.execute(users.insert().values(**row))
    except IntegrityError as exc:
        raise UsernameTaken(username) from exc
    return {"id": result.inserted_primary_key[0], **{k: v for k, v in row.items() if k != "password_hash"}}


async def by_username(conn: AsyncConnection, username: str) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(*PUBLIC_COLUMNS, users.c.password_hash).where(users.c.username == username))).first()
    return row._asdict() if row else None


async def set_password_hash(conn: AsyncConnection, user_id: int, password_hash: str) -> None:
    await conn.execute(users.update().where(users.c.id == user_id).values(password_hash=password_hash))


async def by_id(conn: AsyncConnection, user_id: int) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(*PUBLIC_COLUMNS).where(users.c.id == user_id))).first()
    return row._asdict() if row else None


async def search(conn: AsyncConnection, prefix: str, limit: int, after: str | None) -> list[dict[str, Any]]:
    query = sa.select(*PUBLIC_COLUMNS).order_by(users.c.username).limit(limit)
    if prefix:
        query = query.where(users.c.username.startswith(prefix, autoescape=True))
    if after is not None:
        query = query.where(users.c.username > after)
    return [row._asdict() for row in await conn.execute(query)]
