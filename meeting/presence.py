"""Who is online: last-seen time and device count per user; and how many devices a user may have.

With Redis, shared by every instance:
- the seed plan's hash `online_users` (namespaced `<prefix>:online_users`):
  user id -> last-seen unix time, written on connect, disconnect and heartbeat;
- `<prefix>:{u<user id>}:devices`, a sorted set of that user's connection ids
  scored by an expiry two heartbeats ahead, refreshed every heartbeat. A
  connection is counted while its entry has not expired, so the devices of an
  instance that dies without cleaning up (SIGKILL) go offline by themselves
  within two heartbeat intervals.

The same sorted set enforces `push.max_connections_per_user` across instances:
`admit` counts the live entries and adds the new connection in one Lua call,
so two instances admitting at once cannot both take the last place. Connects
that arrive together (a reconnect storm) share that call (meeting.combine): the
script takes them one after the other, each against the count its predecessors
left, so sharing changes nothing of the cap. The count is approximate in these
ways, all documented in docs/websocket.md:
- while Redis is out (the breaker open) each instance checks only its own
  connections, so a user may hold up to the cap on every instance;
- a connection admitted while Redis was out gets its entry with the first
  heartbeat after Redis answers again, added without a cap check: the user
  stays above the cap for as long as those connections stay open (new ones
  are refused meanwhile), not briefly;
- a connection closed while Redis was out is not removed from the set (the
  removal is skipped, not queued): its entry counts until it expires, up to
  two heartbeats after its last refresh; so do the entries of a crashed
  instance. A user at the cap may be refused 4029 meanwhile.

Without Redis, or while the breaker is open, each process counts and answers
from its own connections.

On a Redis Cluster the hash and a user's set live on different shards: the
admission script there touches the set alone, one call per connect (the sets of
several users are on several shards), and the last-seen time follows in a
command of its own (it is not part of the cap, so it needs no atomicity).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Iterable

from .breaker import REDIS_FAILURES, RedisBreaker
from .combine import Combiner
from .config import RedisConfig
from .redis_client import key

Status = dict[str, object]
WHAT = "presence"

# One connect on a Redis Cluster, where the online hash is on another shard (it follows in a
# command of its own). KEYS: the devices zset. ARGV: connection id, now, expiry, key ttl, max.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Many connects in one call (standalone Redis only), each in turn as _ADMIT, then its user in the online hash.
# KEYS: the devices zset of each connect, then the online hash. ARGV: now, expiry, key ttl,
# then per connect its connection id, user id and max. Answers 1 or 0 per connect.
_ADMIT_MANY = """
local n = #KEYS - 1
local admitted = {}
for i = 1, n do
  local id, user, max = ARGV[3 * i + 1], ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[i]) >= max then
    admitted[i] = 0
  else
    redis.call('ZADD', KEYS[i], ARGV[2], id)
    redis.call('EXPIRE', KEYS[i], ARGV[3])
    redis.call('HSET', KEYS[n + 1], user, ARGV[1])
    admitted[i] = 1
  end
end
return admitted
"""
Admission = tuple[int, str, int]  # user id, connection id, limit


class Presence:
    def __init__(self, breaker: RedisBreaker, cfg: RedisConfig, heartbeat: float, admit_batch: int = 500):
        self._breaker = breaker
        self._prefix = cfg.prefix
        self._cluster = cfg.cluster
        self._seen_key = f"{cfg.prefix}:online_users"
        self._lifetime = 2 * heartbeat
        self._local: dict[int, set[str]] = {}
        self._local_seen: dict[int, float] = {}
        self._admit = breaker.client.register_script(_ADMIT) if breaker.client is not None else None
        self._admit_many = breaker.client.register_script(_ADMIT_MANY) if breaker.client is not None else None
        self._admissions: Combiner[Admission, bool | None] = Combiner(self._admit_batch, admit_batch, name="ws-admissions")

    def _devices_key(self, user_id: int) -> str:
        return key(self._prefix, user_id, "devices")

    async def admit(self, user_id: int, connection_id: str, limit: int) -> bool:
        """Count this connection in (and return True) unless the user already has `limit`
        live connections on all instances together. The caller checked this instance's own
        connections first; while Redis is out that is the only check."""
        self._local.setdefault(user_id, set()).add(connection_id)
        now = time.time()
        self._local_seen[user_id] = now
        if self._breaker.available:
            try:
                if self._cluster:
                    admitted = await self._admit_one(user_id, connection_id, limit, now)
                else:
                    admitted = await self._admissions.submit((user_id, connection_id, limit))
            except BaseException:  # not admitted after all (a bug, or cancelled): no stray local entry
                self._forget(user_id, connection_id)
                raise
            if admitted is False:
                self._forget(user_id, connection_id)
                return False
        return True

    async def _admit_one(self, user_id: int, connection_id: str, limit: int, now: float) -> bool | None:
        """On a cluster: one call per connect. None if Redis could not be asked."""
        try:
            admitted = await self._admit(  # type: ignore[misc]
                keys=[self._devices_key(user_id)],
                args=[connection_id, f"{now:.3f}", f"{now + self._lifetime:.3f}", int(self._lifetime) + 1, limit])
            if admitted:
                await self._breaker.client.hset(self._seen_key, str(user_id), f"{now:.3f}")  # type: ignore[union-attr]
        except REDIS_FAILURES as exc:
            self._breaker.failed(exc, WHAT)  # counted locally only; the heartbeat adds its entry later
            return None
        return bool(admitted)

    async def _admit_batch(self, admissions: list[Admission]) -> list[bool | None | Exception]:
        """The connects that arrived together, in one call. None for each if Redis could not
        be asked: they are counted locally only, and the heartbeat adds their entries later."""
        now = time.time()
        args: list[object] = [f"{now:.3f}", f"{now + self._lifetime:.3f}", int(self._lifetime) + 1]
        for user_id, connection_id, limit in admissions:
            args += [connection_id, user_id, limit]
        try:
            answers = await self._admit_many(  # type: ignore[misc]
                keys=[*(self._devices_key(user_id) for user_id, _, _ in admissions), self._seen_key], args=args)
        except REDIS_FAILURES as exc:
            self._breaker.failed(exc, WHAT)
            return [None] * len(admissions)
        except Exception as exc:  # no connect's fault: each alone would only fail again, one after another
            return [exc] * len(admissions)
        return [bool(a) for a in answers]

    async def close(self) -> None:
        """Let the admission under way finish (its connects are waiting on it)."""
        await self._admissions.close()

    def _forget(self, user_id: int, connection_id: str) -> None:
        devices = self._local.get(user_id, set())
        devices.discard(connection_id)
        if not devices:
            self._local.pop(user_id, None)

    async def disconnected(self, user_id: int, connection_id: str) -> None:
        self._forget(user_id, connection_id)
        await self._write([], [(user_id, connection_id)])

    async def heartbeat(self, connections: Iterable[tuple[int, str]]) -> None:
        """Extend every local connection's entry, in one round trip."""
        await self._write(list(connections), [])

    async def _write(self, alive: list[tuple[int, str]], gone: list[tuple[int, str]]) -> None:
        now = time.time()
        for user_id, _ in (*alive, *gone):
            self._local_seen[user_id] = now
        if not (alive or gone) or not self._breaker.available:
            return
        try:
            async with self._breaker.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                for user_id, connection_id in alive:
                    key = self._devices_key(user_id)
                    pipe.zadd(key, {connection_id: now + self._lifetime})
                    pipe.expire(key, int(self._lifetime) + 1)
                for user_id, connection_id in gone:
                    pipe.zrem(self._devices_key(user_id), connection_id)
                pipe.hset(self._seen_key, mapping={str(u): f"{now:.3f}" for u, _ in (*alive, *gone)})
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self._breaker.failed(exc, WHAT)

    async def status(self, user_ids: list[int]) -> dict[int, Status]:
        seen: list[float | None] = [self._local_seen.get(u) for u in user_ids]
        devices = [len(self._local.get(u, ())) for u in user_ids]
        if self._breaker.available and user_ids:
            now = time.time()
            try:
                async with self._breaker.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                    pipe.hmget(self._seen_key, [str(u) for u in user_ids])
                    for user_id in user_ids:
                        pipe.zcount(self._devices_key(user_id), now, "+inf")
                    raw_seen, *counts = await pipe.execute()
                seen = [float(v) if v is not None else None for v in raw_seen]
                devices = [int(c) for c in counts]
            except REDIS_FAILURES as exc:
                self._breaker.failed(exc, WHAT)
        return {u: {"online": n > 0, "last_seen": dt.datetime.fromtimestamp(s, dt.timezone.utc) if s else None, "devices": n}
                for u, s, n in zip(user_ids, seen, devices)}
