"""Queries on idempotency_keys (see meeting.idempotency for the semantics).

`found` reads the rows of the keys a transaction is about to use; `insert` writes
the new ones as the transaction's last statement (after every users lock, so the
send path's lock order is unchanged); `prune` deletes expired rows in bounded chunks.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import idempotency_keys as ik
from . import driver
from .packets import Packets

Pair = tuple[int, str]

# Built once, like the send path's other statements (building one costs about as much as
# executing it). The lookup asks for every user among the pairs and every key among them,
# then keeps the exact pairs: on the primary key (user_id, idempotency_key) that is the
# same point reads for a batch of one, and two plain expanding lists cost SQLAlchemy far
# less per execution than a list of tuples rendered each time. It may read a row of a
# pair not asked for (user A's key that user B also sent): a plain read, it locks nothing.
_FOUND = sa.select(ik.c.user_id, ik.c.idempotency_key, ik.c.fingerprint, ik.c.status, ik.c.response, ik.c.created_at).where(
    ik.c.user_id.in_(sa.bindparam("users", expanding=True)), ik.c.idempotency_key.in_(sa.bindparam("keys", expanding=True)))
_INSERT = ik.insert()


class KeyTaken(Exception):
    """Another transaction committed a row for one of these keys since we looked."""


async def found(conn: AsyncConnection, pairs: Iterable[Pair]) -> dict[Pair, dict[str, Any]]:
    """The stored rows among (user_id, key) `pairs`, expired or not, in one query."""
    pairs = sorted(set(pairs))
    if not pairs:
        return {}
    wanted = set(pairs)
    rows = await conn.execute(_FOUND, {"users": sorted({u for u, _ in pairs}), "keys": sorted({k for _, k in pairs})})
    return {pair: r._asdict() for r in rows if (pair := (r.user_id, r.idempotency_key)) in wanted}


async def forget(conn: AsyncConnection, pairs: Iterable[Pair], before: dt.datetime) -> None:
    """Delete the rows among `pairs` created before `before` (expired, not pruned yet)."""
    pairs = sorted(set(pairs))
    if pairs:
        await conn.execute(ik.delete().where(sa.tuple_(ik.c.user_id, ik.c.idempotency_key).in_(pairs), ik.c.created_at < before))


_FIELDS = ("user_id", "idempotency_key", "fingerprint", "status", "response", "created_at")


async def insert(conn: AsyncConnection, rows: list[dict[str, Any]], packets: Packets | None = None) -> None:
    """Rows with user_id, idempotency_key, fingerprint, status, response, created_at. With
    `packets`, sent with the COMMIT (meeting.storage.packets)."""
    if not rows:
        return
    if packets is not None:
        sql = f"INSERT INTO idempotency_keys ({', '.join(_FIELDS)}) VALUES {', '.join(['(%s, %s, %s, %s, %s, %s)'] * len(rows))}"
        packets.defer((sql, [driver.stored(row[f]) for row in rows for f in _FIELDS]), _taken)
        return
    try:
        await conn.execute(_INSERT, rows)
    except IntegrityError as exc:
        raise KeyTaken(str(exc.orig)) from exc


def _taken(exc: Exception) -> Exception:
    return KeyTaken(str(exc.orig)) if isinstance(exc, IntegrityError) else exc


async def prune(conn: AsyncConnection, before: dt.datetime, limit: int) -> int:
    """Delete up to `limit` rows created before `before`, oldest first; how many went.

    The select locks nothing (MariaDB, READ COMMITTED), so a send may meanwhile delete an
    expired row and commit a fresh one for the same key: the delete asks for the age again,
    or it would remove that fresh row and let a retry within the TTL store a second copy."""
    oldest = sa.select(ik.c.user_id, ik.c.idempotency_key).where(ik.c.created_at < before).order_by(ik.c.created_at).limit(limit)
    doomed = [tuple(r) for r in await conn.execute(oldest)]
    if not doomed:
        return 0
    result = await conn.execute(ik.delete().where(sa.tuple_(ik.c.user_id, ik.c.idempotency_key).in_(doomed), ik.c.created_at < before))
    return int(result.rowcount)

