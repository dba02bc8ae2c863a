"""One circuit breaker per process for everything that talks to Redis.

Redis is an accelerator (cache, presence, cross-instance fan-out), never a
dependency of a request: when it is unreachable or hung, requests must answer
at their usual speed from the database and the local connection map. So the
first failure seen by any user of Redis (the cache, presence, the brokers'
publisher or a reader that cannot reconnect) opens the breaker for all of
them: while it is open no request sends a command to Redis, and none pays a
timeout. (The brokers' background tasks keep trying on their own: they delay
no request, and a frame they gave up on could not always be repaired.)

Requests do not probe Redis themselves (that would cost one request a timeout
per probe interval). A background task pings it every `PROBE_INTERVAL`
seconds instead and closes the breaker on the first answer; it then runs the
`on_recovered` hooks (the cache orphans entries a lost invalidation made
suspect, the broker tells every instance to resynchronise).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
# RedisClusterException is no RedisError: a cluster with no reachable node or an uncovered slot.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
Hook = Callable[[], Awaitable[None]]


class RedisBreaker:
    """Open after a failure, closed again by the background probe; failures are
    logged at most once per `log_interval`."""

    def __init__(self, client: aioredis.Redis | RedisCluster | None, log_interval: float, probe_timeout: float):
        self.client = client
        self.errors = 0         # every failure reported, whoever saw it
        self.failures: Counter[str] = Counter()  # the same, by who saw it (`what`)
        self.trips = 0          # closed -> open transitions
        self.on_recovered: list[Hook] = []
        self._log_interval = log_interval
        self._probe_timeout = probe_timeout
        self._last_log = float("-inf")
        self._opened_at = 0.0
        self._open = False
        self._probe: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()  # set while Redis may be used
        self._closed.set()

    @property
    def available(self) -> bool:
        """Redis is configured and the breaker is closed: worth sending a command."""
        return self.client is not None and not self._open

    @property
    def open(self) -> bool:
        return self._open

    def failed(self, exc: BaseException, what: str) -> None:
        """Report a failed Redis command: open the breaker (if closed) and probe in the background."""
        self.errors += 1
        self.failures[what] += 1
        now = time.monotonic()
        if now - self._last_log >= self._log_interval:
            self._last_log = now
            log.warning("redis unavailable (%s: %s: %s); using the database and local delivery (%d failures so far)",
                        what, type(exc).__name__, exc, self.errors)
        if not self._open:
            self._open = True
            self.trips += 1
            self._opened_at = now
            self._closed.clear()
        if self.client is not None and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_answered(), name="redis-probe")

    async def wait_closed(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the breaker to be closed; True if it is."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._closed.is_set()

    async def _probe_until_answered(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(self.client.ping(), self._probe_timeout)
            except REDIS_FAILURES:
                continue
            except Exception:  # anything else (a reply the client cannot parse, a bug) must not end
                log.exception("redis probe failed unexpectedly; probing again")  # the probe: the breaker
                continue  # would stay open for good
            break
        self._open = False
        self._closed.set()
        self._probe = None  # a hook that fails again starts a new probe
        log.info("redis answers again after %.1f s; using it again", time.monotonic() - self._opened_at)
        for hook in list(self.on_recovered):
            try:
                await hook()
            except Exception:
                log.exception("redis recovery hook %r failed", hook)

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
