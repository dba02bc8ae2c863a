"""Smoke runs of the bench scenarios (tiny sizes): zero loss and a complete JSON result; and the
side-by-side suite against the yardstick, every scenario at 1 % of its size."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

import pytest

from meeting.bench.scenarios import LostOrDoubled, check

from tests.conftest import unavailable

COMMON = {"scenario", "users", "messages", "post_errors", "lost", "duplicated", "connect_seconds", "failed_devices", "send_seconds",
          "post_p50_ms", "post_p95_ms", "post_p99_ms", "post_max_ms", "delivery_p50_ms", "delivery_p95_ms",
          "delivery_p99_ms", "delivery_max_ms", "delivered_per_second", "client_cpu_percent", "client_loop_lag_p99_ms",
          "receiver_cpu_percent", "receiver_loop_lag_p99_ms"}


CONNS = {"scenario", "users", "connections", "answered_ping", "lost", "failed_devices", "connect_seconds", "connects_per_second",
         "handshake_p50_ms", "handshake_p99_ms", "server_rss_before_kib", "server_rss_after_kib", "kib_per_connection",
         "receiver_cpu_percent", "receiver_loop_lag_p99_ms"}
RECONNECT = {"scenario", "users", "backlog", "group", "messages", "copies", "lost", "failed_devices", "duplicated", "all_backlogs_seconds", "backlog_bytes",
             "receiver_cpu_percent"}


CPU = {"cpu_per", "cpu_ops", "cpu_phase_seconds", "cpu_cores",
       *(f"cpu_{group}_{unit}" for group in ("server", "mariadbd", "redis", "sender", "receiver", "machine", "other")
         for unit in ("ms", "ms_per_op", "cores"))}
COMMON |= CPU
CONNS |= CPU
RECONNECT |= CPU


def _sane_cpu(result: dict[str, Any], per: str, ops: int) -> None:
    """The measured phase's CPU: every figure there and non-negative, the server's above zero
    (its pid is known with --spawn); where /proc is missing, every figure is None."""
    assert (result["cpu_per"], result["cpu_ops"]) == (per, ops)
    figures = {k: v for k, v in result.items() if k.startswith("cpu_") and k not in ("cpu_per", "cpu_ops")}
    if sys.platform != "linux":
        assert set(figures.values()) == {None}, figures
        return
    assert all(v is not None and v >= 0 for k, v in figures.items() if not k.startswith(("cpu_mariadbd", "cpu_redis"))), figures
    assert result["cpu_server_ms"] > 0 and result["cpu_phase_seconds"] > 0 and result["cpu_cores"] >= 1
    assert result["cpu_server_ms_per_op"] == pytest.approx(result["cpu_server_ms"] / ops, abs=1e-3)


async def _bench(*args: str) -> dict:
    """One scenario run, as JSON."""
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
    _sane_cpu(result, "message", 40)


async def test_fanout_smoke_run() -> None:
    result = await _bench("fanout", "--users", "12", "--recipients", "5", "--messages", "10", "--concurrency", "2")
    assert COMMON | {"recipients", "devices", "frames"} <= set(result)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["frames"] == 10 * 5 * 2
    assert result["receiver_gc_collections"] == 0  # the receiving devices' process stalls for no collector
    _sane_cpu(result, "frame", 10 * 5 * 2)


async def test_reconnect_smoke_run() -> None:
    result = await _bench("reconnect", "--users", "15", "--backlog", "4", "--group", "4")
    assert RECONNECT <= set(result)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["copies"] == 60
    assert result["messages"] == 4 * 4  # 15 users in groups of 4, 3 and 4 messages each
    assert result["backlog_bytes"] > 60 * len('"content":"backlog 0"')  # every copy's body was counted
    _sane_cpu(result, "synced device", 15)


async def test_conns_smoke_run() -> None:
    result = await _bench("conns", "--connections", "40", "--users", "10")
    assert CONNS <= set(result)
    assert result["answered_ping"] == 40 and result["lost"] == 0 and result["server_rss_after_kib"] > 0
    _sane_cpu(result, "connect", 40)


def test_a_lost_copy_fails_the_run() -> None:
    check({"scenario": "x", "lost": 0, "duplicated": 0, "post_errors": 0})
    for bad in ({"lost": 1, "duplicated": 0}, {"lost": 0, "duplicated": 2}):
        with pytest.raises(LostOrDoubled):
            check({"scenario": "x", "post_errors": 0, **bad})


def test_plot_draws_the_delivery_distribution(tmp_path: Any) -> None:
    from meeting.bench.__main__ import plot

    target = tmp_path / "latency.png"
    plot([0.001 * (i % 20 + 1) for i in range(500)], "smoke", str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5000


async def test_a_device_that_cannot_connect_is_counted_not_waited_for(api: Any) -> None:
    from meeting.bench.harness import receivers

    user = await api.user()
    url = str(api.client.make_url("/")).rstrip("/")
    with receivers(url, [user.token, "not-a-token"]) as devices:
        ready = await devices.ready(60)
        assert ready["devices"] == 2 and ready["failed"] == 1
        frames, _ = await devices.collect(0, 0.0)
    assert frames == []


async def test_side_by_side_suite_smoke_against_the_yardstick() -> None:
    """Every scenario of issue 12 at 1 % of its size, once on each side: both figures, the ratio
    and a clean ledger on every row. Needs ../shared/yardstick (or MEETING_BENCH_TOY), which CI has
    beside its clone, so there it fails instead of skipping."""
    from meeting.bench.servers import ToyMissing, find_toy
    from meeting.bench.suite import ENTRY_NAMES

    try:
        toy = find_toy()
    except ToyMissing as exc:
        unavailable(f"the yardstick is not found: {exc}")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meeting.bench", "suite", "--spawn", "--scale", "0.01",
                                                "--runs", "1", "--toy", str(toy),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-3000:]
    results, cpu = out.decode().split("\nCPU in each scenario's measured phase")
    rows = [line.split(" | ") for line in results.splitlines() if line.startswith("| ") and not line.startswith("| scenario")]
    assert len(rows) == len(ENTRY_NAMES) + 1, out.decode()  # + memory per connection
    for label, toy_cell, ours, ratio, target, met, ledger, _ in rows:
        assert toy_cell.startswith("**") and ours.startswith("**") and ratio.endswith("x"), label
        assert ledger == "0 / 0; 0 / 0" and met in ("yes", "**no**"), label
    progress = [line.split(":")[0] for line in err.decode().splitlines() if line.startswith("# ")]
    assert progress == [f"# {name} run 1/1 {side}" for name in ENTRY_NAMES for side in ("toy", "meeting")]
    # The CPU table: a row per scenario and side, every group's ms per operation [cores], none
    # negative; the server's above zero (the toy's may round to no tick in a phase this short).
    # mariadbd and redis-server are n/a where none runs in sight (e.g. in another container).
    cpu_rows = [line.strip("| ").split(" | ") for line in cpu.splitlines() if line.startswith("| `")]
    assert [(name, side) for name, side, *_ in cpu_rows] == [(f"`{n}`", s) for n in ENTRY_NAMES for s in ("toy", "meeting")]
    number = r"(\d[\d,]*(\.\d+)?(e-\d+)?)"
    toy_server = 0.0
    for name, side, per, phase, *groups, server_ceiling, machine_ceiling in cpu_rows:
        assert per in ("message", "frame", "connect", "synced device") and float(phase) > 0, name
        cell = rf"{number} \[{number}\]( = {number}x toy)?"
        assert len(groups) == 7, groups
        assert all(re.fullmatch(cell, g) or (i in (1, 2) and g == "n/a [n/a]") for i, g in enumerate(groups)), groups
        server = float(groups[0].split()[0])
        if side == "meeting":
            assert server > 0 and re.fullmatch(number, server_ceiling) and re.fullmatch(number, machine_ceiling), (name, groups)
        if side == "toy":
            toy_server += server
    assert toy_server > 0  # the toy's rows are measured too, if not every one of them ticks
