"""Who is online: last-seen time and device count per user.

With Redis, shared by every instance:
- the seed plan's hash `online_users` (namespaced `<prefix>:online_users`):
  user id -> last-seen unix time, written on connect, disconnect and heartbeat;
- `<prefix>:devices:<user id>`, a sorted set of that user's connection ids
  scored by an expiry two heartbeats ahead, refreshed every heartbeat. A
  connection is counted while its entry has not expired, so the devices of an
  instance that dies without cleaning up (SIGKILL) go offline by themselves
  within two heartbeat intervals.
Without Redis, or while Redis fails, each process answers from its own connections.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Iterable

import redis.asyncio as aioredis

from .cache import REDIS_FAILURES, RedisGuard
from .config import RedisConfig

Status = dict[str, object]


class Presence:
    def __init__(self, client: aioredis.Redis | None, cfg: RedisConfig, heartbeat: float):
        self._guard = RedisGuard(client, cfg.error_log_interval, "presence")
        self._prefix = cfg.prefix
        self._seen_key = f"{cfg.prefix}:online_users"
        self._lifetime = 2 * heartbeat
        self._local: dict[int, set[str]] = {}
        self._local_seen: dict[int, float] = {}

    def _devices_key(self, user_id: int) -> str:
        return f"{self._prefix}:devices:{user_id}"

    async def connected(self, user_id: int, connection_id: str) -> None:
        self._local.setdefault(user_id, set()).add(connection_id)
        await self._write([(user_id, connection_id)], [])

    async def disconnected(self, user_id: int, connection_id: str) -> None:
        devices = self._local.get(user_id, set())
        devices.discard(connection_id)
        if not devices:
            self._local.pop(user_id, None)
        await self._write([], [(user_id, connection_id)])

    async def heartbeat(self, connections: Iterable[tuple[int, str]]) -> None:
        """Extend every local connection's entry, in one round trip."""
        await self._write(list(connections), [])

    async def _write(self, alive: list[tuple[int, str]], gone: list[tuple[int, str]]) -> None:
        now = time.time()
        for user_id, _ in (*alive, *gone):
            self._local_seen[user_id] = now
        if not (alive or gone) or not self._guard.available:
            return
        try:
            async with self._guard.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                for user_id, connection_id in alive:
                    key = self._devices_key(user_id)
                    pipe.zadd(key, {connection_id: now + self._lifetime})
                    pipe.expire(key, int(self._lifetime) + 1)
                for user_id, connection_id in gone:
                    pipe.zrem(self._devices_key(user_id), connection_id)
                pipe.hset(self._seen_key, mapping={str(u): f"{now:.3f}" for u, _ in (*alive, *gone)})
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self._guard.failed(exc)

    async def status(self, user_ids: list[int]) -> dict[int, Status]:
        seen: list[float | None] = [self._local_seen.get(u) for u in user_ids]
        devices = [len(self._local.get(u, ())) for u in user_ids]
        if self._guard.available and user_ids:
            now = time.time()
            try:
                async with self._guard.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                    pipe.hmget(self._seen_key, [str(u) for u in user_ids])
                    for user_id in user_ids:
                        pipe.zcount(self._devices_key(user_id), now, "+inf")
                    raw_seen, *counts = await pipe.execute()
                seen = [float(v) if v is not None else None for v in raw_seen]
                devices = [int(c) for c in counts]
            except REDIS_FAILURES as exc:
                self._guard.failed(exc)
        return {u: {"online": n > 0, "last_seen": dt.datetime.fromtimestamp(s, dt.timezone.utc) if s else None, "devices": n}
                for u, s, n in zip(user_ids, seen, devices)}
