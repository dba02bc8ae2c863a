"""The bench's statistics must be right before its numbers mean anything."""

import asyncio
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


def test_rss_of_this_process() -> None:
    assert rss_kib(os.getpid()) > 1000


def _run(scenario: str, value: float, lost: int = 0, **extra: float) -> dict:
    from meeting.bench.suite import HEADLINES

    key, _, _, _, extras = HEADLINES[scenario]
    return {"scenario": scenario, key: value, "lost": lost, "duplicated": 0, "post_errors": 0,
            **{name: extra.get(name, 1.0) for name in extras}}


def test_suite_table_reports_the_median_its_range_and_whether_the_target_is_met() -> None:
    import argparse

    import pytest

    from meeting.bench.scenarios import LostOrDoubled
    from meeting.bench.suite import table

    args = argparse.Namespace(env=["MEETING_DATABASE_URL=mysql+aiomysql://x/y", "MEETING_REDIS_URL=redis://z"], runs=3, keys=True)
    rows = table({"throughput": [_run("throughput", v) for v in (1400.0, 1700.0, 1600.0)],
                  "reconnect": [_run("reconnect", v) for v in (5.5, 4.5, 6.0)]}, args).splitlines()
    assert "MariaDB + Redis" in rows[0] and "median of 3" in rows[0] and "every send with an Idempotency-Key" in rows[0]
    throughput = next(r for r in rows if r.startswith("| `throughput`"))
    assert "**1,600**" in throughput and "[1,400-1,700]" in throughput and "| yes |" in throughput
    reconnect = next(r for r in rows if r.startswith("| `reconnect`"))
    assert "**5.5**" in reconnect and "| no |" in reconnect and "| 0 / 0 |" in reconnect
    with pytest.raises(LostOrDoubled):
        table({"fanout": [_run("fanout", 20_000.0), _run("fanout", 20_000.0, lost=2)]}, args)


async def test_suite_runs_each_scenario_runs_times_against_the_given_target() -> None:
    from meeting.bench.__main__ import _parser
    from meeting.bench.suite import run_suite

    seen: list[list[str]] = []

    async def run_one(argv: list[str]) -> dict:
        seen.append(argv)
        return {**_run(argv[0], 100.0), "_delivery_seconds": [0.1]}

    args = _parser().parse_args(["suite", "--spawn", "--env", "A=1", "--runs", "2", "--scenario", "fanout", "--scenario", "conns"])
    out = await run_suite(args, run_one)
    assert seen == [["fanout", "--spawn", "--env=A=1", "--json"]] * 2 + [["conns", "--spawn", "--env=A=1", "--json"]] * 2
    assert "| `fanout` | **100** frames/s [100-100]" in out and "| `conns` |" in out


async def test_suite_without_keys_passes_no_keys_to_every_sending_scenario() -> None:
    from meeting.bench.__main__ import _parser
    from meeting.bench.suite import run_suite

    seen: list[list[str]] = []

    async def run_one(argv: list[str]) -> dict:
        seen.append(argv)
        return {**_run(argv[0], 100.0), "_delivery_seconds": [0.1]}

    args = _parser().parse_args(["suite", "--url", "http://x", "--runs", "1", "--no-keys", "--scenario", "throughput", "--scenario", "conns"])
    out = await run_suite(args, run_one)
    assert seen == [["throughput", "--url", "http://x", "--json", "--no-keys"], ["conns", "--url", "http://x", "--json"]]
    assert "sends without Idempotency-Key" in out.splitlines()[0]
    assert _parser().parse_args(["throughput", "--spawn", "--no-keys"]).keys is False
    assert _parser().parse_args(["throughput", "--spawn"]).keys is True
