"""Read-through Redis cache for unread counts and inbox first pages.

Only those: the sender's reads (the sent box, receipts) are not cached, since
every recipient's read changes them; they are always read from the database,
so they cannot be stale.

The database is the source of truth; the cache must not serve a value older than
a send or read that returned. What makes that hold, and where it stops:

- Every entry is stamped with `<epoch>|<generation>`. A writer commits and then
  replaces the user's generation token. A reader stores what it computed only if
  the generation it read *before* querying the database is still current (checked
  atomically in a Lua script), so a value computed from pre-commit data can
  never be cached after the commit.
- The global epoch `<prefix>:cache:epoch` is an integer; bumping it (to one more
  than both its value and the highest this instance has seen) orphans every entry
  on every instance, which read it with each entry. An instance bumps it when an
  invalidation of its own failed (before it trusts the cache again), when the
  breaker closes after any Redis trouble, and when a broker reconnects (a failover,
  a restart, a resharding: an acknowledged write may have been lost with a master,
  since replication is asynchronous). An instance that reads an epoch lower than
  one it has seen knows that a bump was lost the same way, and bumps again.

What does not hold: between a failover that lost an invalidation and the moment
an instance notices it (its next failed command or reconnect: about a second,
`cluster-node-timeout` plus the probe), an instance may serve the entry the lost
invalidation deleted; so may an instance that started after the lost bump (it
has seen no higher epoch) until some instance notices. Entries live at most
`cache_ttl` seconds in any case. And if the instance whose invalidation failed
dies before it reaches Redis again, nobody bumps for it: other instances may
serve the entries it could not invalidate for up to `cache_ttl`.

Redis trouble never fails a request: it is reported to the process's one
circuit breaker (meeting.breaker), and while the breaker is open the answer
comes from the database without a round trip to Redis.
"""

from __future__ import annotations

import logging
import uuid
from typing import Awaitable, Callable, Iterable, TypeVar

from .breaker import REDIS_FAILURES, RedisBreaker
from .config import RedisConfig
from .redis_client import key

log = logging.getLogger(__name__)

#: The kinds of per-user entry a write invalidates. The inbox kind is renamed whenever
#: the shape of a cached row changes (recipient_ids -> recipient_count: "inbox2"), so
#: no instance decodes another version's rows.
UNREAD = "unread"
INBOX = "inbox2"
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

# KEYS: the epoch. ARGV: the highest epoch this instance has seen. Strictly larger than both, so
# an epoch that went back in a failover never returns to a value some entry was stamped with.
_BUMP = """
local epoch = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') or 0, tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], epoch)
return epoch
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
        self._bump = client.register_script(_BUMP) if client is not None else None
        self.epoch = 0  # the highest epoch seen here
        breaker.on_recovered.append(self.suspect)

    @property
    def available(self) -> bool:
        """True when the cache is in use: Redis configured, breaker closed, no lost invalidation pending."""
        return self._breaker.available and not self._dirty

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._breaker.failed(exc, WHAT)

    async def suspect(self) -> None:
        """Redis may have lost acknowledged writes (it was unreachable, failed over, restarted):
        orphan every entry now, or before the next read if Redis does not answer."""
        if self._breaker.client is not None:
            self._dirty = True
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
                epoch = int(await self._bump(keys=[self._epoch_key], args=[self.epoch]))  # type: ignore[misc]
            except REDIS_FAILURES as exc:
                self._failed(exc)
                return False
            self._dirty = False
            self.epoch = max(self.epoch, epoch)
            log.info("message cache flushed (epoch %d): a write to Redis may have been lost", epoch)
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
        number = _number(epoch)
        if number < self.epoch:  # went back: a failover lost a bump, and with it maybe invalidations
            log.warning("message cache epoch went back from %d to %d; flushing", self.epoch, number)
            await self.suspect()
            return await compute()
        self.epoch = number
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
                        pipe.delete(self._key(user_id, UNREAD), self._key(user_id, INBOX))
                    await pipe.execute()
            else:
                keys = [self._key(user_id, kind) for user_id in users for kind in ("gen", UNREAD, INBOX)]
                await self._invalidate(keys=keys, args=[token, 2 * self._ttl])  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._dirty = True
            self._failed(exc)


def _number(epoch: bytes | None) -> int:
    """The epoch as an integer; 0 when absent (or a pre-integer random token)."""
    try:
        return int(epoch or 0)
    except ValueError:
        return 0
