"""Storage: table definitions, the engine's lifecycle and the migration entry point.

One SQLAlchemy Core code path serves MariaDB/MySQL (aiomysql) and SQLite
(aiosqlite). The per-backend differences live here and only here: column
variants, connection set-up, and the transaction mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from aiohttp import web
from sqlalchemy import (
    BigInteger, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    TypeDecorator, event, text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .config import DatabaseConfig
from .errors import Unavailable
from .pool import ping_when_idle
from .typedefs import config_key, engine_key

log = logging.getLogger(__name__)
T = TypeVar("T")

MYSQL_TABLE_ARGS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci", "mysql_engine": "InnoDB"}
#: Auto-increment ids: BIGINT on MySQL, but INTEGER on SQLite (only INTEGER PRIMARY KEY is the rowid).
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores naive UTC with microseconds (DATETIME(6) on MySQL) and returns aware UTC."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


metadata = MetaData()

users = Table(
    "users", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # utf8mb4_bin: usernames are stored lower-cased, compared byte for byte on both backends.
    Column("username", String(32).with_variant(mysql.VARCHAR(32, collation="utf8mb4_bin"), "mysql", "mariadb"), nullable=False, unique=True),
    Column("display_name", String(64), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # The last per-recipient sequence number given to this user (see message_recipients.seq).
    Column("last_seq", Id, nullable=False, server_default="0"),
    **MYSQL_TABLE_ARGS,
)

meetings = Table(
    "meetings", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("title", String(200), nullable=False),
    Column("organizer_id", Id, ForeignKey("users.id"), nullable=False, index=True),
    Column("starts_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE_ARGS,
)

meeting_participants = Table(
    "meeting_participants", metadata,
    Column("meeting_id", Id, ForeignKey("meetings.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Id, ForeignKey("users.id"), primary_key=True),
    Index("ix_meeting_participants_user", "user_id", "meeting_id"),
    **MYSQL_TABLE_ARGS,
)

messages = Table(
    "messages", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sender_id", Id, ForeignKey("users.id"), nullable=False),
    Column("type", String(32), nullable=False),
    Column("content", Text(), nullable=False),
    Column("meeting_id", Id, ForeignKey("meetings.id"), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # Counters for the sender's view (sent box, receipts): read_count goes up in the
    # transaction that marks a recipient row read, so nobody counts rows to show it.
    Column("recipient_count", Integer, nullable=False, server_default="0"),
    Column("read_count", Integer, nullable=False, server_default="0"),
    Index("ix_messages_sender", "sender_id", "id"),
    **MYSQL_TABLE_ARGS,
)

message_recipients = Table(
    "message_recipients", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("recipient_id", Id, ForeignKey("users.id"), primary_key=True),
    Column("read_at", UTCDateTime(), nullable=True),
    # 1, 2, 3... per recipient, in commit order, no holes: the resume cursor for `since`.
    Column("seq", Id, nullable=False),
    Index("ix_message_recipients_inbox", "recipient_id", "message_id"),
    Index("uq_message_recipients_seq", "recipient_id", "seq", unique=True),
    # "unread of user X, oldest first" is an index range scan: read_at IS NULL is an equality.
    Index("ix_message_recipients_unread", "recipient_id", "read_at", "message_id"),
    **MYSQL_TABLE_ARGS,
)

#: Idempotency-Key ASCII only, case-sensitive on both backends. MariaDB's ascii_bin is PAD SPACE
#: ('k' = 'k '), so the parser refuses keys that start or end with a space (handlers.idempotency).
IdempotencyKey = String(255).with_variant(mysql.VARCHAR(255, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
#: A stored response body: a 1000-recipient message of 10,000 escaped characters can pass TEXT's 64 KiB.
ResponseBody = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

# The response of a POST that carried an Idempotency-Key (see meeting.idempotency),
# written in the same transaction as what it created. No foreign key to users: an
# insert here must not take a shared lock on the users row (writers lock users
# first, FOR UPDATE), and expired rows are pruned anyway.
idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("user_id", Id, primary_key=True, autoincrement=False),
    Column("idempotency_key", IdempotencyKey, primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # sha256 hex of method, route and canonical body
    Column("status", Integer, nullable=False),
    Column("response", ResponseBody, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_idempotency_keys_created", "created_at"),
    **MYSQL_TABLE_ARGS,
)


# A login: the access tokens it issues carry its id (`sid`), its refresh tokens belong to
# it. Revoking it (logout, logout-all, a reused refresh token) ends them all (meeting.sessions).
auth_sessions = Table(
    "auth_sessions", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True, index=True),
    **MYSQL_TABLE_ARGS,
)

# Opaque refresh tokens, stored as their SHA-256: each is used once, and a second use
# (a stolen copy) revokes its session.
refresh_tokens = Table(
    "refresh_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("session_id", Id, ForeignKey("auth_sessions.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
    Column("used_at", UTCDateTime(), nullable=True),
    **MYSQL_TABLE_ARGS,
)


def create_engine(cfg: DatabaseConfig) -> AsyncEngine:
    url = make_url(cfg.url)
    backend = url.get_backend_name()
    # hide_parameters: a logged database error must not carry the values (a password hash, a message).
    # No pool_pre_ping: meeting.pool pings only connections that sat idle (ping_idle).
    kwargs: dict[str, Any] = {"echo": cfg.echo, "hide_parameters": True}
    if backend in ("mysql", "mariadb"):
        if "charset" not in url.query:
            url = url.update_query_dict({"charset": "utf8mb4"})
        kwargs.update(
            pool_size=cfg.pool_size, max_overflow=cfg.pool_size, pool_recycle=3600,
            isolation_level="READ COMMITTED",
            connect_args={"connect_timeout": max(1, round(cfg.connect_timeout)),
                          "init_command": f"SET SESSION innodb_lock_wait_timeout = {cfg.lock_wait_timeout}"},
        )
    elif backend == "sqlite":
        kwargs.update(connect_args={"timeout": max(cfg.connect_timeout, 5.0)})
        if url.database and url.database != ":memory:":
            # One more than pool_size: the group commit keeps one connection (meeting.writer).
            kwargs.update(pool_size=cfg.pool_size, max_overflow=1)
    engine = create_async_engine(url, **kwargs)
    ping_when_idle(engine, cfg.ping_idle)
    if backend == "sqlite":
        _tune_sqlite(engine)
    else:
        _add_autocommit_readers(engine, url, kwargs, cfg.ping_idle)
    return engine


_READ_ENGINE = "meeting_read_engine"  # the attribute of the sync Engine that holds its readers' engine


def _add_autocommit_readers(engine: AsyncEngine, url: Any, kwargs: dict[str, Any], ping_idle: float) -> None:
    """A second pool, in autocommit mode, for `readers(engine)` on MariaDB/MySQL.

    In a transaction, every read ended with a ROLLBACK when its connection went back to the
    pool: a round trip as costly as the one-statement read before it (the sync point of each
    connecting device). In autocommit each statement is its own transaction and nothing is
    left to end: SQLAlchemy still calls the driver's rollback() when a connection is done
    with (aiomysql sends it), unless told `skip_autocommit_rollback`, and the pool resets
    nothing on check-in. Under READ COMMITTED each statement already
    read its own snapshot, so readers lose no consistency they had: what must agree comes
    from one statement (the sync point) or from `snapshot_readers`, which stays on the
    transactional pool. The writers keep their pool; the readers' pool is as large (same
    `pool_size`), lives and dies with it (disposed with the engine).
    """
    reads = create_async_engine(url, **{**kwargs, "isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None,
                                       "skip_autocommit_rollback": True})
    ping_when_idle(reads, ping_idle)
    setattr(engine.sync_engine, _READ_ENGINE, reads)

    @event.listens_for(engine.sync_engine, "engine_disposed")
    def _dispose(_engine: Any) -> None:
        reads.sync_engine.dispose()  # runs in AsyncEngine.dispose's greenlet, so the driver may await

    # A connection found dead (a database restart kills them all) retires every connection of
    # the other pool made before now too, rather than each failing a statement first.
    # `_invalidate(None)` is SQLAlchemy's own retirement of a pool's older connections.
    for one, other in ((engine, reads), (reads, engine)):
        event.listen(one.sync_engine.pool, "invalidate", _retire_on_disconnect(other))


def _retire_on_disconnect(other: AsyncEngine) -> Callable[[Any, Any, BaseException | None], None]:
    dialect = other.sync_engine.dialect

    def _on_invalidate(_dbapi_conn: Any, _record: Any, exc: BaseException | None) -> None:
        if isinstance(exc, DisconnectionError) or (
                exc is not None and dialect.is_disconnect(getattr(exc, "orig", None) or exc, None, None)):
            other.sync_engine.pool._invalidate(None)  # type: ignore[arg-type]

    return _on_invalidate


def _tune_sqlite(engine: AsyncEngine) -> None:
    """Foreign keys on, WAL, and BEGIN IMMEDIATE for writers.

    pysqlite's implicit deferred transactions let two writers both take a read
    lock and then fail to upgrade ("database is locked") without waiting; taking
    the write lock at BEGIN makes concurrent writers queue on the busy timeout.
    Reads (connections from `readers(engine)`) begin deferred: in WAL they never
    need the write lock, and taking it made every read of a reconnect storm queue
    behind every other, some past the busy timeout.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


READ_ONLY = "meeting_read_only"


def readers(engine: AsyncEngine) -> AsyncEngine:
    """For connections that only read, and need no two statements to agree (see
    `snapshot_readers` for that): on MariaDB/MySQL the autocommit pool (see
    `_add_autocommit_readers`), on SQLite the same pool, whose read transactions then begin
    deferred."""
    reads = getattr(engine.sync_engine, _READ_ENGINE, None)
    return reads if reads is not None else engine.execution_options(**{READ_ONLY: True})


def snapshot_readers(engine: AsyncEngine) -> AsyncEngine:
    """Readers whose transaction sees one snapshot for all its statements, for answers
    made of several reads that must agree (a count and the rows it counts). MariaDB
    runs READ COMMITTED, where each statement sees what committed before it; this
    engine's connections run REPEATABLE READ instead (set at checkout, reset when
    returned to the pool). SQLite's deferred read transaction in WAL mode already
    reads one snapshot."""
    transactional = engine.execution_options(**{READ_ONLY: True})  # never the autocommit pool
    if engine.dialect.name in ("mysql", "mariadb"):
        return transactional.execution_options(isolation_level="REPEATABLE READ")
    return transactional


#: InnoDB errors after which nothing of the transaction is kept: deadlock (1213, the whole
#: transaction rolled back) and lock wait timeout (1205, rolled back when we leave `begin()`).
LOCK_CONFLICTS = frozenset({1205, 1213})


def lock_conflict(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    return isinstance(exc, DBAPIError) and bool(getattr(orig, "args", None)) and orig.args[0] in LOCK_CONFLICTS


class CommitFailed(Exception):
    """The COMMIT itself raised (e.g. the connection was lost while committing): the
    transaction may or may not have been applied, so it is never retried here. `result`
    is what the work returned. Anything raised before the COMMIT leaves as itself: then
    nothing was applied."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


#: A transaction's own runner on a connection: `work`'s result, CommitFailed if its COMMIT failed.
Run = Callable[[AsyncConnection, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]
#: Where a transaction gets its connection: `engine.connect` unless told otherwise (meeting.writer).
Connect = Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]]


async def transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]], attempts: int,
                      connect: Connect | None = None, run: Run | None = None) -> T:
    """Run `work` in one transaction, and run it again, whole, when the database picked it
    as a deadlock victim or it timed out waiting for a lock: nothing of it was committed,
    so a retry is safe (and `work` must do nothing outside the transaction). Writers lock
    users rows in one order, so this is the rare case; when it keeps happening the caller
    gets a retryable 503, never a 500. A failed COMMIT raises CommitFailed, never retried
    here (see meeting.messages for how it is settled). `run` replaces SQLAlchemy's
    transaction around `work` (meeting.storage.packets.run, which raises CommitFailed itself)."""
    for attempt in range(1, attempts + 1):
        try:
            return await _once(connect or engine.connect, work, run)
        except DBAPIError as exc:
            if not lock_conflict(exc):
                raise
            log.info("transaction lost a lock conflict (%s), attempt %d of %d", exc.orig.args[0], attempt, attempts)
        if attempt < attempts:
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))  # de-synchronise the colliding writers
    raise Unavailable("The database is busy; nothing was stored. Try again.", code="database_busy")


async def _once(connect: Connect, work: Callable[[AsyncConnection], Awaitable[T]], run: Run | None) -> T:
    """`engine.begin()` around `work`, except that a failure of the COMMIT raises CommitFailed."""
    async with connect() as conn:
        if run is not None:
            return await run(conn, work)
        tx = await conn.begin()
        try:
            result = await work(conn)
        except BaseException:
            with contextlib.suppress(Exception):  # a lost connection cannot roll back; the server does
                await tx.rollback()
            raise
        try:
            await tx.commit()
        except Exception as exc:
            # Its state is unknown: closed, never back to the pool (closing rolls back what
            # the server still holds open; on MariaDB the server also sees the socket close).
            with contextlib.suppress(Exception):
                await conn.invalidate()
            raise CommitFailed(f"{type(exc).__name__}: {exc}", result) from exc
        return result


MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision`` over the given engine."""
    from alembic import command

    def _upgrade(sync_conn: Any) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        mysql_lock = conn.dialect.name in ("mysql", "mariadb")
        if mysql_lock:  # instances starting together must not run the same DDL twice
            await conn.exec_driver_sql("SELECT GET_LOCK('meeting_migrate', 60)")
        try:
            await conn.run_sync(_upgrade)
        finally:
            if mysql_lock:
                await conn.exec_driver_sql("SELECT RELEASE_LOCK('meeting_migrate')")
    log.info("database schema is at %s", revision)


async def ping(engine: AsyncEngine, timeout: float) -> None:
    async def _select_one() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    await asyncio.wait_for(_select_one(), timeout)


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the engine lives exactly as long as the app."""
    cfg = app[config_key].database
    engine = create_engine(cfg)
    if cfg.auto_migrate:
        await migrate(engine)
    app[engine_key] = engine
    yield
    await engine.dispose()

