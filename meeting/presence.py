"""Who is online: last-seen time and device count per user.

With Redis, the seed plan's hash `online_users` (user id -> last-seen unix
time, namespaced as `<prefix>:online_users`) plus `<prefix>:online_devices`
(user id -> open connections) are shared by every instance. Without Redis, or
while Redis fails, the answer comes from this process's own connections.
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
    def __init__(self, client: aioredis.Redis | None, cfg: RedisConfig):
        self._guard = RedisGuard(client, cfg.error_log_interval, "presence")
        self._seen_key = f"{cfg.prefix}:online_users"
        self._devices_key = f"{cfg.prefix}:online_devices"
        self._local_devices: dict[int, int] = {}
        self._local_seen: dict[int, float] = {}

    async def connected(self, user_id: int) -> None:
        self._local_devices[user_id] = self._local_devices.get(user_id, 0) + 1
        await self._update(user_id, +1)

    async def disconnected(self, user_id: int) -> None:
        left = self._local_devices.get(user_id, 0) - 1
        if left > 0:
            self._local_devices[user_id] = left
        else:
            self._local_devices.pop(user_id, None)
        await self._update(user_id, -1)

    async def _update(self, user_id: int, delta: int) -> None:
        now = time.time()
        self._local_seen[user_id] = now
        if not self._guard.available:
            return
        try:
            async with self._guard.client.pipeline(transaction=True) as pipe:  # type: ignore[union-attr]
                pipe.hset(self._seen_key, str(user_id), f"{now:.3f}")
                pipe.hincrby(self._devices_key, str(user_id), delta)
                devices = (await pipe.execute())[1]
            if devices <= 0:
                await self._guard.client.hdel(self._devices_key, str(user_id))  # type: ignore[union-attr]
        except REDIS_FAILURES as exc:
            self._guard.failed(exc)

    async def heartbeat(self, user_ids: Iterable[int]) -> None:
        """Refresh last-seen for every locally connected user in one round trip."""
        now = time.time()
        ids = list(user_ids)
        for user_id in ids:
            self._local_seen[user_id] = now
        if not ids or not self._guard.available:
            return
        try:
            await self._guard.client.hset(self._seen_key, mapping={str(u): f"{now:.3f}" for u in ids})  # type: ignore[union-attr]
        except REDIS_FAILURES as exc:
            self._guard.failed(exc)

    async def status(self, user_ids: list[int]) -> dict[int, Status]:
        seen: list[float | None] = [self._local_seen.get(u) for u in user_ids]
        devices = [self._local_devices.get(u, 0) for u in user_ids]
        if self._guard.available and user_ids:
            keys = [str(u) for u in user_ids]
            try:
                async with self._guard.client.pipeline(transaction=False) as pipe:  # type: ignore[union-attr]
                    pipe.hmget(self._seen_key, keys)
                    pipe.hmget(self._devices_key, keys)
                    raw_seen, raw_devices = await pipe.execute()
                seen = [float(v) if v is not None else None for v in raw_seen]
                devices = [max(0, int(v)) if v is not None else 0 for v in raw_devices]
            except REDIS_FAILURES as exc:
                self._guard.failed(exc)
        return {u: {"online": n > 0, "last_seen": dt.datetime.fromtimestamp(s, dt.timezone.utc) if s else None, "devices": n}
                for u, s, n in zip(user_ids, seen, devices)}
