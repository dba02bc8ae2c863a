"""Which access tokens still stand: logins (sessions) and their revocation.

Access tokens are JWTs checked without the database, so revoking one needs state
that every instance shares: the `auth_sessions` table. Each token names its session
(`sid`); a request is let in when that session is live, which is asked of the
database once per session (once for all the requests that ask together) and then
remembered; a session this instance just created is remembered without asking.
Every instance polls the table for sessions revoked since it last looked
(`auth.revocation_poll`, 0.5 s by default), so a logout, a logout-all or a reused
refresh token makes the session's access tokens 401 everywhere, and the instance
holding its WebSockets closes them with 4001, within a poll interval; on the
instance that revoked it, at once. The database is
the channel on purpose: it is there in every deployment, Redis or not, and
revocations are few.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from typing import Callable, Iterable

from sqlalchemy.ext.asyncio import AsyncEngine

from .db import readers, utcnow
from .errors import Unauthorized
from .storage import sessions as store

log = logging.getLogger(__name__)

#: Called with (session id, user id) pairs just revoked: the push side closes their sockets.
RevokedListener = Callable[[list[tuple[int, int]]], None]
#: Clocks of instances differ a little: each poll looks this far behind its last watermark.
CLOCK_SLACK = dt.timedelta(seconds=5)


def revoked_error() -> Unauthorized:
    return Unauthorized("This session was logged out; log in again.", code="token_revoked")


class Sessions:
    def __init__(self, engine: AsyncEngine, token_ttl: int, cache_size: int = 100_000):
        self._reads = readers(engine)
        self._engine = engine
        self._token_ttl = dt.timedelta(seconds=token_ttl)
        self._live: OrderedDict[int, int] = OrderedDict()  # session id -> user id, known live
        self._asking: dict[tuple[int, int], asyncio.Future[bool]] = {}  # (session, user) -> the question in flight
        self._revoked: dict[int, dt.datetime] = {}          # session id -> when (kept while its tokens may live)
        self._cache_size = cache_size
        self._watermark = utcnow() - self._token_ttl
        self.on_revoked: list[RevokedListener] = []

    def is_revoked(self, session_id: int | None) -> bool:
        return session_id in self._revoked

    async def check(self, session_id: int, user_id: int) -> None:
        """401 unless the session is live: a revoked one, or one that does not exist (a
        token from another deployment with the same secret, a user who is gone)."""
        if session_id in self._revoked:
            raise revoked_error()
        if self._live.get(session_id) == user_id:
            self._live.move_to_end(session_id)
            return
        # A reconnect storm brings every device of a session at once: one question for all.
        key = (session_id, user_id)
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = asyncio.ensure_future(self._is_live(session_id, user_id))
            asking.add_done_callback(lambda done: self._asked(key, done))
        if not await asyncio.shield(asking):
            raise Unauthorized("This token's session or user does not exist; log in again.", code="token_revoked")
        if session_id in self._revoked:  # revoked while we asked
            raise revoked_error()
        self.remember(session_id, user_id)

    def remember(self, session_id: int, user_id: int) -> None:
        """This session is live: just created or checked (a revocation, ours or polled, forgets it)."""
        if session_id in self._revoked:
            return
        self._live[session_id] = user_id
        self._live.move_to_end(session_id)
        if len(self._live) > self._cache_size:
            self._live.popitem(last=False)

    async def _is_live(self, session_id: int, user_id: int) -> bool:
        async with self._reads.connect() as conn:
            return await store.is_live(conn, session_id, user_id)

    def _asked(self, key: tuple[int, int], done: "asyncio.Future[bool]") -> None:
        self._asking.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: the askers (if any are left) raise it themselves

    def revoked(self, pairs: Iterable[tuple[int, int]], when: dt.datetime | None = None) -> int:
        """Record revocations (ours, or seen by the poll) and tell the listeners once each;
        answers how many were new."""
        new = []
        for session_id, user_id in pairs:
            if session_id not in self._revoked:
                self._revoked[session_id] = when or utcnow()
                self._live.pop(session_id, None)
                new.append((session_id, user_id))
        if new:
            for listener in self.on_revoked:
                try:
                    listener(new)
                except Exception:
                    log.exception("revocation listener %r failed", listener)
        return len(new)

    async def poll(self) -> int:
        """One look at the table for sessions revoked since the last; answers how many were new."""
        started = utcnow()
        async with self._reads.connect() as conn:
            rows = await store.revoked_since(conn, self._watermark - CLOCK_SLACK)
        new = 0
        for session_id, user_id, revoked_at in rows:
            new += self.revoked([(session_id, user_id)], revoked_at)
            # Never past our own clock: a row stamped by a fast clock must not hide the
            # revocations that slower clocks stamp after it.
            self._watermark = min(max(self._watermark, revoked_at), started)
        cutoff = utcnow() - self._token_ttl - CLOCK_SLACK  # tokens of sessions revoked before this have expired
        for session_id in [s for s, at in self._revoked.items() if at < cutoff]:
            del self._revoked[session_id]
        return new

    async def prune(self) -> None:
        async with self._engine.begin() as conn:
            await store.prune(conn, utcnow() - self._token_ttl - CLOCK_SLACK)

    async def run(self, interval: float, prune_every: float = 3600.0) -> None:
        """The poller: a task for the app's lifetime. Its first look loads the sessions
        revoked within a token lifetime; until then `check` asks the database about every
        session it does not know, so nothing revoked gets in meanwhile (nor if the
        database is down at start)."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + prune_every
        failing = False
        while True:
            try:
                await self.poll()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + prune_every
                    await self.prune()
                if failing:
                    log.info("session revocation poll works again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not twice a second
                    log.warning("session revocation poll failed (%s: %s); retrying every %.1f s", type(exc).__name__, exc, interval)
                failing = True
            await asyncio.sleep(interval)
