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
from .redis_client import key

log = logging.getLogger(__name__)
T = TypeVar("T")
WHAT = "the message cache"

# KEYS: the user's gen and entry (one hash tag). The entry's stamp also carries the
# global epoch (another shard in a cluster, so not checked here): an entry stored
# after an epoch change is never served, since readers compare the whole stamp.
_SET_IF_CURRENT = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# KEYS: (gen, unread, inbox2) per user. One command however many users: a
# pipeline of two commands per recipient cost the sender more CPU than its SQL.
# (A cluster cannot run one script over many users' shards: there it is a pipeline.)
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
        self._cluster = cfg.cluster
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

    def _key(self, user_id: int, kind: str) -> str:
        return key(self._prefix, user_id, "cache", kind)

    @property
    def _epoch_key(self) -> str:
        return f"{self._prefix}:cache:epoch"

    async def _usable(self) -> bool:
        if not self._breaker.available:
            return False
        if self._dirty:  # an invalidation was lost: orphan every entry before trusting any
            try:
                await self._breaker.client.set(self._epoch_key, uuid.uuid4().hex)  # type: ignore[union-attr]
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
        keys = [self._key(user_id, "gen"), self._key(user_id, kind)]
        try:
            if self._cluster:  # the epoch lives on another shard
                async with client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                    for name in (self._epoch_key, *keys):  # (no MGET in a cluster pipeline)
                        pipe.get(name)
                    epoch, gen, entry = await pipe.execute()
            else:
                epoch, gen, entry = await client.mget([self._epoch_key, *keys])  # type: ignore[union-attr]
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
            await self._script(keys=keys, args=[(gen or b'').decode(), f"{stamp}\n{encode(value)}", self._ttl, 2 * self._ttl])  # type: ignore[misc]
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
        users = list(user_ids)
        if not users:
            return
        token = uuid.uuid4().hex  # one fresh token for all: it only has to differ from each user's previous one
        try:
            if self._cluster:
                async with self._breaker.client.pipeline(transaction=False) as pipe:
                    for user_id in users:
                        pipe.set(self._key(user_id, "gen"), token, ex=2 * self._ttl)
                        pipe.delete(self._key(user_id, "unread"), self._key(user_id, "inbox2"))
                    await pipe.execute()
            else:
                keys = [self._key(user_id, kind) for user_id in users for kind in ("gen", "unread", "inbox2")]
                await self._invalidate(keys=keys, args=[token, 2 * self._ttl])  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._dirty = True
            self._failed(exc)
