"""The group commit's transaction on MariaDB in two packets instead of six round trips.

A send batch ran six statements one after the other (users lock, seq bump, messages
insert, recipients insert, key insert, COMMIT), each a write to MariaDB's socket, a
wake-up of the server on the same 2 cores and a wait for its answer. None of them but
the first and the messages insert has an answer the next statement needs, so on a
connection with CLIENT.MULTI_STATEMENTS they go as two packets: the lock, the bump
(computed from the drafts on the bet that every user exists) and the messages insert
with its RETURNING; then the recipients rows, the key rows and the COMMIT.

MariaDB runs a packet's statements in order and stops at the first that fails: the
ones after it never run, so a COMMIT after a failed statement is never executed. Hence:

- a statement that fails before the COMMIT leaves the transaction open; it is rolled
  back and the failure raised as the same statement alone would have raised it (a lock
  conflict is retried whole by db.transaction, a taken key is KeyTaken);
- a connection lost anywhere in the commit packet, or the COMMIT's own failure, leaves
  the outcome unknown: the connection is invalidated and the runner raises CommitFailed,
  settled as any failed COMMIT is (meeting.messages).

The flag needs no set-up of ours: aiomysql sets CLIENT.MULTI_STATEMENTS on every
connection it opens, whatever it is given (aiomysql.connection.Connection.__init__), so
every pooled connection always took several statements per packet; a dedicated engine
for the writer would not confine it. What keeps a packet to our statements is the rule
kept everywhere: values are the driver's escaped parameters (`cursor.mogrify`, as in
any `cursor.execute`), never text put into the SQL.

SQLAlchemy's transaction is not used here (its commit would send a COMMIT of its own):
the packed transaction's statements all go through `Packets`, and `run` refuses to
commit one that also ran a statement through SQLAlchemy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import CommitFailed
from . import driver
from .driver import Statement

T = TypeVar("T")
Wrap = Callable[[DBAPIError], Exception]


#: The most a commit packet carries, by a generous estimate of its escaped size: far below
#: MariaDB's max_allowed_packet (16 MiB by default) however a batch's key rows and
#: recipient rows add up. Before the deferred statements were packed each was a packet.
PACKET_BYTES = 4 * 1024 * 1024


def _size(statement: Statement) -> int:
    """An upper bound of its escaped size in bytes: 4 bytes a character, each escaped."""
    sql, args = statement
    return len(sql) + sum(8 * len(a) if isinstance(a, str) else 32 for a in args)


class Unclear(Exception):
    """The commit packet failed in a way that may have come after its COMMIT ran."""


@dataclass
class Sent:
    """The rows of each statement that ran, in order, and the failure that stopped the rest."""
    rows: list[list[tuple[Any, ...]]]
    error: Exception | None = None


@dataclass
class Packets:
    conn: AsyncConnection
    fairy: Any
    _deferred: list[tuple[Statement, Wrap | None]] = field(default_factory=list)

    async def send(self, statements: list[Statement]) -> Sent:
        """One packet. A server's error answers which statement failed (those before it ran,
        those after it did not); a lost connection is invalidated and raised."""
        cursor = await self.fairy.driver_connection.cursor()
        sql = "; ".join(cursor.mogrify(s, a) for s, a in statements)
        rows: list[list[tuple[Any, ...]]] = []
        try:
            await cursor.execute(sql)
            rows.append(list(await cursor.fetchall()))
            while len(rows) < len(statements) and await cursor.nextset():
                rows.append(list(await cursor.fetchall()))
            if len(rows) != len(statements):
                raise RuntimeError(f"{len(statements)} statements answered {len(rows)} results")
        except Exception as exc:
            error = await driver.wrapped(self.conn, self.fairy, cursor, "; ".join(s for s, _ in statements), exc)
            if isinstance(error, DBAPIError) and not error.connection_invalidated and self._servers_answer(exc):
                return Sent(rows, error)
            await self._invalidate(exc)  # not a server's answer: where the stream stands is unknown
            if error is exc:
                raise
            if isinstance(error, DBAPIError):  # as SQLAlchemy says of a connection it invalidated:
                error.connection_invalidated = True  # the writer runs a first packet again on a fresh one
            raise error from exc
        except BaseException as exc:  # cancelled mid-packet: what ran is unknown, the stream unread
            await self._invalidate(exc)
            raise
        return Sent(rows)

    def _servers_answer(self, exc: Exception) -> bool:
        """Whether `exc` is MariaDB's answer to one statement (an error number outside the
        client's 2000-2999, on a connection still open): then the statements after it did not
        run. aiomysql raises errors of its own while reading results (a packet out of
        sequence, closing the socket as it raises): those say nothing of what the server ran,
        and a COMMIT later in the packet may have been applied."""
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        if code is None or 2000 <= code < 3000:
            return False
        return not getattr(self.fairy.driver_connection, "closed", False)

    def defer(self, statement: Statement, wrap: Wrap | None = None) -> None:
        """Send `statement` with the COMMIT; `wrap` turns its failure into the caller's exception."""
        self._deferred.append((statement, wrap))

    async def commit(self) -> None:
        """The deferred statements and the COMMIT, in as few packets of up to PACKET_BYTES as
        they fit (one, but for batches of long messages to many recipients with keys)."""
        deferred, self._deferred = self._deferred, []
        packets: list[list[tuple[Statement, Wrap | None]]] = [[]]
        size = 0
        for item in deferred:
            size += _size(item[0])
            if size > PACKET_BYTES and packets[-1]:
                packets.append([])
                size = _size(item[0])
            packets[-1].append(item)
        for packet in packets[:-1]:  # no COMMIT in these: nothing is applied if they fail, however
            await self._send_deferred(packet, commits=False)
        await self._send_deferred(packets[-1], commits=True)

    async def _send_deferred(self, deferred: list[tuple[Statement, Wrap | None]], commits: bool) -> None:
        try:
            sent = await self.send([s for s, _ in deferred] + ([("COMMIT", ())] if commits else []))
        except Exception as exc:
            if not commits:
                raise
            raise Unclear(str(exc)) from exc
        if sent.error is None:
            return
        if len(sent.rows) == len(deferred):  # the COMMIT itself failed
            await self._invalidate(sent.error)
            raise Unclear(str(sent.error)) from sent.error
        wrap = deferred[len(sent.rows)][1]
        error = wrap(sent.error) if wrap is not None and isinstance(sent.error, DBAPIError) else sent.error
        if error is sent.error:
            raise error
        raise error from sent.error

    async def rollback(self) -> None:
        if not self.conn.invalidated:
            await driver.execute(self.conn, "ROLLBACK", ())

    async def _invalidate(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            if not self.conn.invalidated:
                await self.conn.invalidate(exc if isinstance(exc, Exception) else None)


async def run(conn: AsyncConnection, work: Callable[[Packets], Awaitable[T]]) -> T:
    """`work` in one transaction of packets, committed with its deferred statements (the
    `run` of db.transaction). Raises CommitFailed, with the result, when the COMMIT may or
    may not have been applied (the connection invalidated); anything else raised means
    nothing was applied."""
    packets = Packets(conn, await driver.pooled(conn))
    if packets.fairy.driver_connection.get_autocommit():
        # Packet 1 sends no BEGIN: with autocommit on it would commit the seq bump and the
        # message without their recipients. aiomysql's default, and SQLAlchemy's on check-in.
        raise RuntimeError("a packed transaction needs a connection with autocommit off")
    try:
        result = await work(packets)
        if conn.in_transaction():
            raise RuntimeError("a statement of a packed transaction went through SQLAlchemy")
        await packets.commit()
    except Unclear as exc:
        raise CommitFailed(f"{type(exc.__cause__).__name__}: {exc}", result) from exc.__cause__
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection cannot roll back; the server does
            await packets.rollback()
        raise
    return result
