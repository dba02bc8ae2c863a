"""The send transaction's statements on MariaDB, straight on the aiomysql connection.

Measured on this host (uvloop, MariaDB 10.11, 2,000 executions of the users lock on
one connection): through SQLAlchemy's AsyncConnection.execute a statement costs
120-180 us of CPU, on the aiomysql cursor under it 55-65 us. The greenlet hop,
execution context, parameter and result processing cost twice the round trip
itself, and a send runs four or more statements per batch. So `insert_many`'s
statements run here on MariaDB, in the same transaction (the same DBAPI
connection, which SQLAlchemy began and will commit), with plain SQL and values
already in the column's stored form (naive UTC datetimes, as UTCDateTime stores).

They are twins of storage.messages' statements (the users lock, the seq bump, the two
inserts): a column added to those tables is added here too. Every storage test runs on
SQLite, which takes SQLAlchemy's path, and on MariaDB, which takes this one.

A failure is wrapped as SQLAlchemy wraps it (OperationalError, IntegrityError...,
with `connection_invalidated` after invalidating a connection found dead), so the
lock-conflict retry (meeting.db.transaction), the kept connection's fresh retry
(meeting.writer) and the error middleware see what they always saw. SQLite keeps
SQLAlchemy's path: its statements run in aiosqlite's thread, not over a socket.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection


def available(conn: AsyncConnection) -> bool:
    return conn.dialect.driver == "aiomysql"


#: Recipient rows per INSERT: well under MariaDB's max_allowed_packet (16 MiB by default).
RECIPIENT_CHUNK = 10_000
MESSAGE_FIELDS = ("sender_id", "type", "content", "meeting_id", "created_at", "recipient_count")


Statement = tuple[str, Sequence[Any]]


def lock_statement(ids: list[int]) -> Statement:
    """storage.messages' _LOCK_USERS: ascending ids, FOR UPDATE."""
    return f"SELECT id, last_seq FROM users WHERE id IN ({_marks(len(ids))}) ORDER BY id FOR UPDATE", ids


def bump_statement(step: int, ids: list[int]) -> Statement:
    return f"UPDATE users SET last_seq = last_seq + %s WHERE id IN ({_marks(len(ids))})", [step, *ids]


def insert_messages_statement(rows: list[dict[str, Any]]) -> Statement:
    """Its rows are the ids, in order: MariaDB (>= 10.5) returns the rows of a multi-row
    INSERT ... RETURNING in the order it inserted them."""
    sql = f"INSERT INTO messages ({', '.join(MESSAGE_FIELDS)}) VALUES {_rows(len(rows), len(MESSAGE_FIELDS))} RETURNING id"
    return sql, [stored(row[f]) for row in rows for f in MESSAGE_FIELDS]


def insert_recipients_statements(rows: list[tuple[int, int, int]]) -> list[Statement]:
    """(message_id, recipient_id, seq) rows, RECIPIENT_CHUNK per statement."""
    return [(f"INSERT INTO message_recipients (message_id, recipient_id, seq) VALUES {_rows(len(chunk), 3)}",
             [value for row in chunk for value in row])
            for chunk in (rows[start:start + RECIPIENT_CHUNK] for start in range(0, len(rows), RECIPIENT_CHUNK))]


async def lock_users(conn: AsyncConnection, ids: list[int]) -> list[tuple[Any, ...]]:
    return await execute(conn, *lock_statement(ids))


async def bump_seqs(conn: AsyncConnection, step: int, ids: list[int]) -> None:
    await execute(conn, *bump_statement(step, ids))


async def insert_messages(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
    ids = [message_id for (message_id,) in await execute(conn, *insert_messages_statement(rows))]
    assert len(ids) == len(rows)
    return ids


async def insert_recipients(conn: AsyncConnection, rows: list[tuple[int, int, int]]) -> None:
    for statement in insert_recipients_statements(rows):
        await execute(conn, *statement)


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


def _rows(count: int, width: int) -> str:
    return ", ".join([f"({_marks(width)})"] * count)


def stored(value: Any) -> Any:
    """A value as its column stores it: an aware datetime as naive UTC (meeting.db.UTCDateTime)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


async def pooled(conn: AsyncConnection) -> Any:
    """The pooled DBAPI connection under `conn`. While `conn` is connected it is a plain
    attribute: `get_raw_connection` reads the same one through a greenlet hop (a switch
    there and back, per statement), kept only for a closed or invalidated `conn`, where
    SQLAlchemy raises what it always raised."""
    sync = conn.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        return sync.connection
    return await conn.get_raw_connection()


async def execute(conn: AsyncConnection, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one statement in `conn`'s transaction; its rows (none for a write)."""
    fairy = await pooled(conn)
    cursor = None
    try:
        cursor = await fairy.driver_connection.cursor()
        await cursor.execute(sql, args)
        rows = list(await cursor.fetchall())
        await cursor.close()
        return rows
    except Exception as exc:
        error = await wrapped(conn, fairy, cursor, sql, exc)
        if error is exc:
            raise
        raise error from exc


async def wrapped(conn: AsyncConnection, fairy: Any, cursor: Any, sql: str, exc: Exception) -> Exception:
    """`exc` as SQLAlchemy would raise it (a DBAPIError, `conn` invalidated if it was a
    disconnect); anything not from the driver, as it is. The parameters are never part
    of it (they are the messages' content)."""
    dialect = conn.dialect
    if not isinstance(exc, dialect.loaded_dbapi.Error):
        return exc
    invalidated = dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
    if invalidated:
        await conn.invalidate(exc)
        # As SQLAlchemy does on a disconnect it sees itself: the pool's older connections are
        # retired too (a restart killed them all), rather than each failing a statement first,
        # which took the writer's one retry on a fresh connection.
        conn.sync_engine.pool._invalidate(None)  # type: ignore[arg-type]
    return DBAPIError.instance(sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                               connection_invalidated=invalidated, dialect=dialect)
