"""Rate limits: what no person reaches and every attacker does.

Built on the `limits` library (moving windows). With Redis configured the counts
live there, so a limit holds across instances; without it, in this process.
Redis trouble never refuses a request and never makes one wait: the counts fall
back to this process while the process's Redis circuit breaker (meeting.breaker,
shared with the cache, presence and the brokers) is open, which is what a limit
can honestly promise while Redis is away.

Limits are named after their config keys in the `limits` section; `limits.enabled:
false` turns every one off (benchmarks, trusted networks). The client address is
the peer's, or, when the peer is a configured trusted proxy, the nearest address in
X-Forwarded-For that is not one: a client cannot pick its own address.

On a Redis Cluster (`redis.cluster`) the counts go through the library's cluster
storage (`async+redis+cluster://`), a RedisCluster client of its own: `limits`
cannot borrow ours. Each count is one key touched by one script, so any shard
may hold it. The breaker is per process, not per shard: one shard failing (a
failover) opens it, and until its probe gets an answer every limit of this
process, on every shard, is counted in this process alone.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from typing import Iterable
from urllib.parse import urlsplit

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from .breaker import REDIS_FAILURES, RedisBreaker
from .config import LimitsConfig, RedisConfig
from .errors import TooManyRequests
from .redis_client import no_cluster_retry

log = logging.getLogger(__name__)

#: The rules, each a config key of `limits` holding "<count>/<period>".
RULES = ("login_failures_per_username", "logins_per_address", "registrations_per_address", "sends_per_user",
         "connects_per_user", "connects_per_address", "chat_per_connection")


def networks(value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n.strip(), strict=False) for n in value.split(",") if n.strip()]


class RateLimits:
    def __init__(self, cfg: LimitsConfig, breaker: RedisBreaker, redis_cfg: RedisConfig):
        self.enabled = cfg.enabled
        self._items: dict[str, RateLimitItem] = {name: parse(getattr(cfg, name)) for name in RULES}
        self._trusted = networks(cfg.trusted_proxies)
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._shared = self._local
        self._guard = breaker
        client = breaker.client
        self._cluster_storage: RedisClusterStorage | None = None
        if client is not None and redis_cfg.cluster:
            url = urlsplit(redis_cfg.url)  # the seed node; a cluster has no database number
            # The library's URL has no TLS scheme of its own: `rediss://` becomes ssl=True.
            self._cluster_storage = RedisClusterStorage(
                f"async+redis+cluster://{url.netloc}", implementation="redispy", key_prefix=f"{redis_cfg.prefix}:limits",
                socket_timeout=redis_cfg.socket_timeout, socket_connect_timeout=redis_cfg.socket_timeout,
                ssl=url.scheme == "rediss", retry=no_cluster_retry())  # a timed-out hit retried could count twice
            self._shared = MovingWindowRateLimiter(self._cluster_storage)
        elif client is not None:
            storage = RedisStorage(f"async+{redis_cfg.url}", implementation="redispy", key_prefix=f"{redis_cfg.prefix}:limits",
                                   connection_pool=client.connection_pool)
            self._shared = MovingWindowRateLimiter(storage)
        self.refused = 0

    async def close(self) -> None:
        if self._cluster_storage is not None:
            await self._cluster_storage.bridge.storage.aclose()

    async def hit(self, rule: str, *identity: object, shared: bool = True) -> None:
        """Count one event; TooManyRequests (with the seconds until the window frees a
        place) if it is over the limit. `shared=False` keeps the count in this process
        (per-connection limits: the connection lives here)."""
        if not self.enabled:
            return
        if not await self._call("hit", rule, identity, shared):
            await self._refuse(rule, identity, shared)

    async def reset(self, rule: str, *identity: object) -> None:
        """Forget the count (a login that succeeded clears its username's failures)."""
        if self.enabled:
            await self._call("clear", rule, identity, True)

    async def _call(self, method: str, rule: str, identity: Iterable[object], shared: bool) -> bool:
        keys = [rule, *map(str, identity)]
        limiter = self._shared if shared and self._guard.available else self._local
        try:
            return bool(await getattr(limiter, method)(self._items[rule], *keys))
        except REDIS_FAILURES as exc:
            self._guard.failed(exc, "rate limits")
            return bool(await getattr(self._local, method)(self._items[rule], *keys))

    async def _refuse(self, rule: str, identity: Iterable[object], shared: bool) -> None:
        self.refused += 1
        keys = [rule, *map(str, identity)]
        limiter = self._shared if shared and self._guard.available else self._local
        try:
            reset = (await limiter.get_window_stats(self._items[rule], *keys)).reset_time
        except REDIS_FAILURES:
            reset = time.time() + self._items[rule].get_expiry()
        raise TooManyRequests("Too many requests; slow down.", retry_after=max(1, math.ceil(reset - time.time())),
                              details={"limit": rule.replace("_", " ")})

    def client_address(self, request: web.BaseRequest) -> str:
        """The peer, or behind trusted proxies the first untrusted hop from the right."""
        peer = request.remote or ""
        if not self._trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)
