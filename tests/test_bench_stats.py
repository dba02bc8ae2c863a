"""The bench's statistics must be right before its numbers mean anything."""

import asyncio
import gc
import math
import os

from meeting.bench.stats import ClientHealth, Ledger, percentile, rss_kib, summary


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100, shuffled order must not matter
    values.reverse()
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and percentile([1.0, 2.0], 50) == 1.0
    assert math.isnan(percentile([], 50))


def test_summary_converts_seconds_to_milliseconds() -> None:
    result = summary([0.001, 0.002, 0.003, 0.010])
    assert result["count"] == 4 and result["p50_ms"] == 2.0 and result["max_ms"] == 10.0 and result["mean_ms"] == 4.0


def test_ledger_counts_lost_and_duplicated_copies_per_device() -> None:
    ledger = Ledger()
    ledger.expect(1, [10, 11])
    ledger.expect(2, [10])
    ledger.record(1, 10)
    ledger.record(1, 10)   # a duplicate on device 10
    ledger.record(2, 10)
    ledger.record(3, 12)   # never expected: a stray copy counts as duplicated
    assert ledger.lost == 1          # message 1 never reached device 11
    assert ledger.duplicated == 2
    clean = Ledger()
    clean.expect(5, [1, 2])
    clean.record(5, 2)
    clean.record(5, 1)
    assert (clean.lost, clean.duplicated) == (0, 0)


async def test_client_health_reports_cpu_and_loop_lag() -> None:
    health = ClientHealth(interval=0.01)
    health.start()
    await asyncio.sleep(0.05)
    sum(i * i for i in range(300_000))  # block the loop a little: lag must show
    await asyncio.sleep(0.03)
    result = await health.stop()
    assert result["loop_lag_max_ms"] > 1.0 and result["cpu_percent"] > 0


async def test_client_health_counts_the_collectors_runs() -> None:
    health = ClientHealth(interval=0.01)
    health.start()
    gc.collect()
    gc.collect()
    result = await health.stop()
    assert result["gc_collections"] >= 2 and result["gc_ms"] >= 0
    gc.collect()
    assert health.gc_collections == result["gc_collections"]  # stopped: no longer counting


def test_rss_of_this_process() -> None:
    assert rss_kib(os.getpid()) > 1000
