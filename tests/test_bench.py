"""Smoke runs of the bench scenarios (tiny sizes): zero loss and a complete JSON result."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from meeting.bench.scenarios import LostOrDoubled, check

COMMON = {"scenario", "users", "messages", "post_errors", "lost", "duplicated", "connect_seconds", "send_seconds",
          "post_p50_ms", "post_p95_ms", "post_p99_ms", "post_max_ms", "delivery_p50_ms", "delivery_p95_ms",
          "delivery_p99_ms", "delivery_max_ms", "delivered_per_second", "client_cpu_percent", "client_loop_lag_p99_ms",
          "receiver_cpu_percent", "receiver_loop_lag_p99_ms"}


async def _bench(*args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meeting.bench", *args, "--spawn", "--json",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "extra"),
    [(("throughput", "--users", "6", "--messages", "40", "--concurrency", "4"), {"concurrency"}),
     (("latency", "--users", "6", "--rate", "40", "--duration", "1"), {"rate"})],
)
async def test_scenario_smoke_run(args: tuple[str, ...], extra: set[str]) -> None:
    result = await _bench(*args)
    assert COMMON | extra <= set(result), COMMON | extra - set(result)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["post_errors"] == 0
    assert result["messages"] == 40 and result["delivery_p50_ms"] > 0


def test_a_lost_copy_fails_the_run() -> None:
    check({"scenario": "x", "lost": 0, "duplicated": 0, "post_errors": 0})
    for bad in ({"lost": 1, "duplicated": 0}, {"lost": 0, "duplicated": 2}):
        with pytest.raises(LostOrDoubled):
            check({"scenario": "x", "post_errors": 0, **bad})
