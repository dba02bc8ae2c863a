"""The group commit's own connection: kept between transactions, not checked out each time.

The send path runs one transaction at a time (meeting.combine), so one connection
serves it. Taking it from the pool for every batch cost a checkout, a ping (a round
trip: `pool_pre_ping`) and a check-in per batch, as much as one of its statements.
Kept, it skips all three. What the ping protected against (a connection the server
closed meanwhile: a restart, `wait_timeout`) is handled where it shows: a kept
connection that turns out dead fails at its first statement, before any COMMIT, so
nothing was applied and the transaction runs once more on a fresh, pinged one.
A connection that failed in any way is handed back to the pool (or discarded, if
it is invalid), never kept.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import transaction
from .storage import packets

log = logging.getLogger(__name__)
T = TypeVar("T")


class WriterConnection:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._kept: AsyncConnection | None = None
        self._closed = False

    async def transaction(self, work: Callable[[Any], Awaitable[T]], attempts: int, packed: bool = False) -> T:
        """`db.transaction` on the kept connection (see the module's docstring); `packed`,
        `work` gets a storage.packets.Packets instead of the connection."""
        run = packets.run if packed else None
        if self._kept is not None:
            try:
                return await transaction(self._engine, work, attempts, self._connection, run)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                log.info("the writer's kept connection was gone (%s); running the transaction on a fresh one", exc.orig)
        return await transaction(self._engine, work, attempts, self._connection, run)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        conn, self._kept = self._kept, None
        if conn is None:
            conn = await self._engine.connect()
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        if self._closed or conn.invalidated or conn.closed:
            await conn.close()
            return
        self._kept = conn

    async def close(self) -> None:
        """Back to the pool, before the engine is disposed; a write after this keeps nothing."""
        self._closed = True
        conn, self._kept = self._kept, None
        if conn is not None:
            await conn.close()
