"""Read-through Redis cache for unread counts and inbox first pages.

The database is the source of truth; a client must never see a stale value
after its send or read returned. Two mechanisms make that hold:

- Every entry is stamped with `<epoch>|<generation>`. A writer commits and then
  replaces the user's generation token. A reader stores what it computed only if
  the stamp it read *before* querying the database is still current (checked
  atomically in a Lua script), so a value computed from pre-commit data can
  never be cached after the commit.
- If an invalidation fails (Redis down, timeout), this instance bypasses the
  cache until it manages to replace the global epoch, which orphans every entry.

Redis trouble never fails a request: it is counted, logged once per interval,
and the answer comes from the database. After a failure Redis is not tried
again for `RETRY_AFTER` seconds, so an unreachable Redis costs one timeout per
interval rather than one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Awaitable, Callable, Iterable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .config import RedisConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_AFTER = 1.0
REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)

_SET_IF_CURRENT = """
local stamp = (redis.call('GET', KEYS[1]) or '') .. '|' .. (redis.call('GET', KEYS[2]) or '')
if stamp ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
return 1
"""

# KEYS: (gen, unread, inbox) per user. One command however many users: a
# pipeline of two commands per recipient cost the sender more CPU than its SQL.
_INVALIDATE = """
for i = 1, #KEYS, 3 do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
  redis.call('DEL', KEYS[i + 1], KEYS[i + 2])
end
return #KEYS / 3
"""


class RedisGuard:
    """Shared failure policy: count, log once per interval, back off briefly."""

    def __init__(self, client: aioredis.Redis | None, log_interval: float, what: str):
        self.client = client
        self.errors = 0
        self._what = what
        self._log_interval = log_interval
        self._last_log = float("-inf")
        self._retry_at = 0.0

    @property
    def available(self) -> bool:
        return self.client is not None and time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self._retry_at = now + RETRY_AFTER
        if now - self._last_log >= self._log_interval:
            self._last_log = now
            log.warning("redis unavailable for %s (%s: %s); using the database (%d failures so far)",
                        self._what, type(exc).__name__, exc, self.errors)


class MessageCache:
    def __init__(self, client: aioredis.Redis | None, cfg: RedisConfig):
        self._guard = RedisGuard(client, cfg.error_log_interval, "the message cache")
        self._prefix = cfg.prefix
        self._ttl = cfg.cache_ttl
        self._dirty = False
        self.hits = 0
        self.misses = 0
        self._script = client.register_script(_SET_IF_CURRENT) if client is not None else None
        self._invalidate = client.register_script(_INVALIDATE) if client is not None else None

    @property
    def errors(self) -> int:
        return self._guard.errors

    @property
    def available(self) -> bool:
        """False while backing off after a Redis failure (or with no Redis)."""
        return self._guard.available

    def _key(self, *parts: object) -> str:
        return ":".join([self._prefix, "cache", *map(str, parts)])

    async def _usable(self) -> bool:
        if not self._guard.available:
            return False
        if self._dirty:  # an invalidation was lost: orphan every entry before trusting any
            try:
                await self._guard.client.set(self._key("epoch"), uuid.uuid4().hex)  # type: ignore[union-attr]
            except REDIS_FAILURES as exc:
                self._guard.failed(exc)
                return False
            self._dirty = False
            log.info("message cache flushed after a lost invalidation")
        return True

    async def get(self, kind: str, user_id: int, compute: Callable[[], Awaitable[T]],
                  encode: Callable[[T], str], decode: Callable[[str], T]) -> T:
        if not await self._usable():
            return await compute()
        client = self._guard.client
        keys = [self._key("epoch"), self._key("gen", user_id), self._key(kind, user_id)]
        try:
            epoch, gen, entry = await client.mget(keys)  # type: ignore[union-attr]
        except REDIS_FAILURES as exc:
            self._guard.failed(exc)
            return await compute()
        stamp = f"{(epoch or b'').decode()}|{(gen or b'').decode()}"
        if entry is not None:
            entry_stamp, _, payload = entry.decode().partition("\n")
            if entry_stamp == stamp:
                self.hits += 1
                return decode(payload)
        self.misses += 1
        value = await compute()
        try:
            await self._script(keys=keys, args=[stamp, f"{stamp}\n{encode(value)}", self._ttl, 2 * self._ttl])  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._guard.failed(exc)
        return value

    async def invalidate(self, user_ids: Iterable[int]) -> None:
        """Call after the commit that changed these users' data, before answering."""
        if self._guard.client is None:
            return
        if not self._guard.available:
            self._dirty = True
            return
        keys = [self._key(kind, user_id) for user_id in user_ids for kind in ("gen", "unread", "inbox")]
        if not keys:
            return
        try:  # one fresh token for all: it only has to differ from each user's previous one
            await self._invalidate(keys=keys, args=[uuid.uuid4().hex, 2 * self._ttl])  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._dirty = True
            self._guard.failed(exc)
