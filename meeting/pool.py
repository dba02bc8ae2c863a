"""Pooled connections are pinged before use only when they sat unused for a while.

`pool_pre_ping` pings on every checkout: a round trip, as much as the query it
precedes. A reconnect storm checks a connection out for every device (the sync
point), and under load every pooled connection was handed back a moment ago,
when it demonstrably worked. So, as HikariCP does (its 500 ms "alive bypass"),
a connection checked in less than `database.ping_idle` seconds ago is handed out
without a ping; an older one is pinged, and a dead one is replaced (SQLAlchemy's
documented checkout-listener recipe: raising DisconnectionError makes the pool
connect afresh and, for a disconnect, drop every connection older than it).
What that leaves: a server restart within `ping_idle` of a connection's last use
fails that connection's next statement (a retryable 503 for a read; the group
commit's writer retries, see meeting.writer), after which the pool starts over.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

_RETURNED = "meeting_returned_at"  # record.info: (the DBAPI connection's id, monotonic time it came back)


def ping_when_idle(engine: AsyncEngine, idle: float) -> None:
    """Install the checkin/checkout listeners on the engine's pool (see the module docstring)."""
    sync = engine.sync_engine
    dialect = sync.dialect

    @event.listens_for(sync.pool, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        if dbapi_conn is not None:
            record.info[_RETURNED] = (id(dbapi_conn), time.monotonic())

    @event.listens_for(sync.pool, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get(_RETURNED)
        if returned is None or returned[0] != id(dbapi_conn):
            return  # a connection made just now: nothing to ping
        if time.monotonic() - returned[1] < idle:
            return
        try:
            alive = dialect.do_ping(dbapi_conn)
        except Exception as exc:
            if not dialect.is_disconnect(exc, dbapi_conn, None):
                raise
            alive = False
        if not alive:
            raise DisconnectionError("a pooled connection did not answer its ping")
