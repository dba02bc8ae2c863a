"""The bench's own arithmetic: percentiles, loss/duplicate accounting, client health."""

from __future__ import annotations

import asyncio
import gc
import math
import resource
import time
from collections import Counter
from typing import Iterable


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds of values given in seconds."""
    ms = [v * 1000 for v in values]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
            "max_ms": max(ms) if ms else math.nan, "mean_ms": sum(ms) / len(ms) if ms else math.nan}


class Ledger:
    """Which copies were due (message id x device) and which arrived: lost and doubled copies."""

    def __init__(self) -> None:
        self.expected: Counter[tuple[int, int]] = Counter()
        self.received: Counter[tuple[int, int]] = Counter()

    def expect(self, message_id: int, devices: Iterable[int]) -> None:
        for device in devices:
            self.expected[(message_id, device)] += 1

    def record(self, message_id: int, device: int) -> None:
        self.received[(message_id, device)] += 1

    @property
    def lost(self) -> int:
        return sum(max(0, n - self.received[key]) for key, n in self.expected.items())

    @property
    def duplicated(self) -> int:
        return sum(max(0, n - self.expected[key]) for key, n in self.received.items())


class ClientHealth:
    """The load generator's own CPU, event-loop lag and cyclic garbage collections, so a
    saturated or stalling client shows."""

    def __init__(self, interval: float = 0.05):
        self._interval = interval
        self.lags: list[float] = []
        self._cpu0 = self._cpu()
        self._wall0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.gc_collections = 0
        self.gc_seconds = 0.0
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.process_time()
        else:
            self.gc_collections += 1
            self.gc_seconds += time.process_time() - self._gc_started

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        gc.callbacks.append(self._on_gc)

    async def _watch(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self._interval)
            self.lags.append(max(0.0, time.monotonic() - before - self._interval))

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        wall = time.monotonic() - self._wall0
        return {"cpu_percent": round(100 * (self._cpu() - self._cpu0) / wall, 1) if wall else 0.0,
                "loop_lag_p99_ms": percentile([x * 1000 for x in self.lags], 99),
                "loop_lag_max_ms": max(self.lags) * 1000 if self.lags else 0.0,
                "gc_collections": self.gc_collections, "gc_ms": round(self.gc_seconds * 1000, 1)}


def rss_kib(pid: int) -> int:
    """Resident set size of a process (Linux /proc), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
