"""Read-through Redis cache for unread counts and inbox first pages.

Only those: the sender's reads (the sent box, receipts) are not cached, since
every recipient's read changes them; they are always read from the database,
so they cannot be stale.

The database is the source of truth; a client must never see a stale value
after its send or read returned. Two mechanisms make that hold:

- Every entry is stamped with `<epoch>|<generation>`. A writer commits and then
  replaces the user's generation token. A reader stores what it computed only if
  the stamp it read *before* querying the database is still current (checked
  atomically in a Lua script), so a value computed from pre-commit data can
  never be cached after the commit.
- If an invalidation fails (Redis down, timeout, or the breaker open), this
  instance bypasses the cache until it has replaced the global epoch
  `<prefix>:cache:epoch`, which orphans every entry on every instance (they all
  read the epoch with each entry). It does so as soon as Redis answers again:
  on the breaker's recovery, not on this instance's next cache read, so another
  instance stops serving a suspect entry even if this one serves no reads.

Redis trouble never fails a request: it is reported to the process's one
circuit breaker (meeting.breaker), and while the breaker is open the answer
comes from the database without a round trip to Redis.

What stays per instance: between the lost invalidation and this instance's
next contact with Redis, other instances (which reach Redis) may still serve
the entries it could not invalidate, for at most `cache_ttl` seconds; and if
this instance dies before it reaches Redis again, nobody bumps the epoch.
"""

from __future__ import annotations

import logging
import uuid
from typing import Awaitable, Callable, Iterable, TypeVar

from .breaker import REDIS_FAILURES, RedisBreaker
from .config import RedisConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
WHAT = "the message cache"

_SET_IF_CURRENT = """
local stamp = (redis.call('GET', KEYS[1]) or '') .. '|' .. (redis.call('GET', KEYS[2]) or '')
if stamp ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
return 1
"""

# KEYS: (gen, unread, inbox2) per user. One command however many users: a
# pipeline of two commands per recipient cost the sender more CPU than its SQL.
_INVALIDATE = """
for i = 1, #KEYS, 3 do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
  redis.call('DEL', KEYS[i + 1], KEYS[i + 2])
end
return #KEYS / 3
"""


class MessageCache:
    def __init__(self, breaker: RedisBreaker, cfg: RedisConfig):
        self._breaker = breaker
        self._prefix = cfg.prefix
        self._ttl = cfg.cache_ttl
        self._dirty = False
        self.hits = 0
        self.misses = 0
        self.errors = 0  # Redis failures seen by the cache itself
        client = breaker.client
        self._script = client.register_script(_SET_IF_CURRENT) if client is not None else None
        self._invalidate = client.register_script(_INVALIDATE) if client is not None else None
        breaker.on_recovered.append(self._usable_now)

    @property
    def available(self) -> bool:
        """True when the cache is in use: Redis configured, breaker closed, no lost invalidation pending."""
        return self._breaker.available and not self._dirty

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._breaker.failed(exc, WHAT)

    async def _usable_now(self) -> None:
        await self._usable()

    def _key(self, *parts: object) -> str:
        return ":".join([self._prefix, "cache", *map(str, parts)])

    async def _usable(self) -> bool:
        if not self._breaker.available:
            return False
        if self._dirty:  # an invalidation was lost: orphan every entry before trusting any
            try:
                await self._breaker.client.set(self._key("epoch"), uuid.uuid4().hex)  # type: ignore[union-attr]
            except REDIS_FAILURES as exc:
                self._failed(exc)
                return False
            self._dirty = False
            log.info("message cache flushed after a lost invalidation")
        return True

    async def get(self, kind: str, user_id: int, compute: Callable[[], Awaitable[T]],
                  encode: Callable[[T], str], decode: Callable[[str], T]) -> T:
        if not await self._usable():
            return await compute()
        client = self._breaker.client
        keys = [self._key("epoch"), self._key("gen", user_id), self._key(kind, user_id)]
        try:
            epoch, gen, entry = await client.mget(keys)  # type: ignore[union-attr]
        except REDIS_FAILURES as exc:
            self._failed(exc)
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
            self._failed(exc)
        return value

    async def invalidate(self, user_ids: Iterable[int]) -> None:
        """Call after the commit that changed these users' data, before answering."""
        if self._breaker.client is None:
            return
        if not self._breaker.available:
            self._dirty = True
            return
        keys = [self._key(kind, user_id) for user_id in user_ids for kind in ("gen", "unread", "inbox2")]
        if not keys:
            return
        try:  # one fresh token for all: it only has to differ from each user's previous one
            await self._invalidate(keys=keys, args=[uuid.uuid4().hex, 2 * self._ttl])  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._dirty = True
            self._failed(exc)
