"""The side-by-side table: issue 12's targets, judged on medians of alternating toy/meeting runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meeting.bench.__main__ import _parser, main
from meeting.bench.cpu import CpuMeter
from meeting.bench.servers import ToyMissing, find_toy
from meeting.bench.suite import ENTRY_NAMES, entries, report, run_entries


def _args(**extra: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"env": ["MEETING_DATABASE_URL=mysql+aiomysql://x/y", "MEETING_REDIS_URL=redis://z"],
                                 "runs": 3, "keys": True, "scale": 1.0, **extra})


def _result(key: str, value: float, lost: int = 0, duplicated: int = 0, **more: float) -> dict[str, Any]:
    return {"scenario": "s", key: value, "lost": lost, "duplicated": duplicated, "post_errors": 0, **more}


def _rows(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"| {start}")]


def test_the_default_entries_are_issue_12s_table() -> None:
    by_name = {e.name: e for e in entries()}
    assert tuple(by_name) == ENTRY_NAMES == ("latency200", "latency1000", "throughput", "fanout", "connect5k", "connect10k",
                                             "reconnect")
    assert by_name["latency200"].kwargs == {"users": 1000, "rate": 200.0, "duration": 10.0}
    assert by_name["latency1000"].kwargs["rate"] == 1000.0
    assert by_name["throughput"].kwargs == {"users": 200, "messages": 10_000, "concurrency": 32}
    assert by_name["fanout"].kwargs == {"users": 1000, "devices": 2, "recipients": 100, "messages": 200, "concurrency": 8}
    assert by_name["connect5k"].kwargs == {"connections": 5000, "users": 1000}
    assert by_name["connect10k"].kwargs == {"connections": 10_000, "users": 2000}
    assert by_name["reconnect"].kwargs == {"users": 2000, "backlog": 20, "group": 10}
    # memory is judged at 10,000 sockets only
    assert [h.key for h in by_name["connect10k"].headlines] == ["connects_per_second", "kib_per_connection"]
    assert [h.key for h in by_name["connect5k"].headlines] == ["connects_per_second"]
    tiny = {e.name: e for e in entries(0.01)}
    assert tiny["fanout"].kwargs["recipients"] < tiny["fanout"].kwargs["users"]
    assert tiny["connect10k"].kwargs == {"connections": 100, "users": 20}


def test_targets_are_ratios_to_the_toy_and_the_absolute_bounds_of_the_issue() -> None:
    by_name = {e.name: e for e in entries()}
    p99_200 = by_name["latency200"].headlines[0].met
    assert p99_200(4.0, 2.5) is True and p99_200(6.0, 5.0) is False and p99_200(4.0, 1.5) is False
    assert p99_200(4.0, None) is None and p99_200(6.0, None) is False  # the absolute half needs no toy
    assert by_name["latency1000"].headlines[0].met(14.0, 1.0) is True and by_name["latency1000"].headlines[0].met(16.0, 30.0) is False
    assert by_name["throughput"].headlines[0].met(2000.0, 2000.0) is True
    assert by_name["throughput"].headlines[0].met(1999.0, 2000.0) is False
    connect, memory = by_name["connect10k"].headlines
    assert connect.met(1300.0, 1285.0) is True and connect.met(389.0, 1285.0) is False
    assert memory.met(15.0, 30.0) is True and memory.met(15.1, 30.0) is False
    assert by_name["reconnect"].headlines[0].met(3.0, 2.0) is True and by_name["reconnect"].headlines[0].met(3.1, 2.0) is False


def test_the_table_shows_both_medians_their_ranges_the_ratio_and_the_verdict() -> None:
    chosen = [e for e in entries() if e.name in ("throughput", "reconnect")]
    results = {("throughput", "toy"): [_result("delivered_per_second", v, post_p50_ms=1.0) for v in (2000.0, 1900.0, 2100.0)],
               ("throughput", "meeting"): [_result("delivered_per_second", v, post_p50_ms=5.0) for v in (1000.0, 1100.0, 1050.0)],
               ("reconnect", "toy"): [_result("all_backlogs_seconds", v) for v in (2.0, 2.2, 1.8)],
               ("reconnect", "meeting"): [_result("all_backlogs_seconds", v) for v in (2.9, 3.0, 3.5)]}
    text, problems = report(chosen, results, _args())
    assert problems is None
    heading = text.splitlines()[0]
    assert "MariaDB + Redis" in heading and "median of 3" in heading and "load average" in heading and "alternating" in heading
    [throughput] = _rows(text, "throughput")
    assert "| **2,000** [1,900-2,100] | **1,050** [1,000-1,100] | 0.53x | >= 1.0x toy | **no** | 0 / 0; 0 / 0 |" in throughput
    assert "post_p50_ms: toy 1, meeting 5" in throughput
    [reconnect] = _rows(text, "reconnect")
    assert "| **2** [1.8-2.2] | **3** [2.9-3.5] | 1.50x | <= 1.5x toy | yes |" in reconnect


def test_a_copy_lost_or_doubled_on_either_side_is_a_failure_and_shows_in_the_table() -> None:
    chosen = [e for e in entries() if e.name == "fanout"]
    results = {("fanout", "toy"): [_result("delivered_per_second", 9000.0, lost=2, delivery_p99_ms=1.0)],
               ("fanout", "meeting"): [_result("delivered_per_second", 9000.0, duplicated=1, delivery_p99_ms=1.0)]}
    text, problems = report(chosen, results, _args(runs=1))
    assert "| 2 / 0; 0 / 1 |" in _rows(text, "fanout")[0]
    assert problems is not None and "toy fanout" in problems and "meeting fanout" in problems


def test_without_the_toy_ratio_targets_cannot_be_judged_but_absolute_ones_can() -> None:
    chosen = [e for e in entries() if e.name in ("throughput", "connect10k")]
    results = {("throughput", "meeting"): [_result("delivered_per_second", 1000.0, post_p50_ms=5.0)],
               ("connect10k", "meeting"): [_result("connects_per_second", 400.0, kib_per_connection=18.0)]}
    text, _ = report(chosen, results, _args(runs=1, env=[]))
    assert "SQLite, no Redis" in text.splitlines()[0] and "meeting only" in text.splitlines()[0]
    assert "| - | **1,000** | - | >= 1.0x toy | n/a |" in _rows(text, "throughput")[0]
    assert "| - | **18** | - | <= 15 KiB (toy's reported) | **no** |" in _rows(text, "server memory")[0]


async def test_runs_alternate_toy_and_meeting_and_each_gets_the_entrys_sizes() -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []

    async def run_one(side: str, scenario: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append((side, scenario, kwargs))
        return {**_result("delivered_per_second", 1.0), "_delivery_seconds": [0.1]}

    chosen = [e for e in entries(0.01) if e.name in ("throughput", "fanout")]
    results = await run_entries(chosen, ("toy", "meeting"), 2, run_one)
    assert [(side, scenario) for side, scenario, _ in seen] == [("toy", "throughput"), ("meeting", "throughput")] * 2 + [
        ("toy", "fanout"), ("meeting", "fanout")] * 2
    assert seen[0][2] == chosen[0].kwargs and len(results[("fanout", "meeting")]) == 2
    assert "_delivery_seconds" not in results[("fanout", "toy")][0]


def test_the_yardstick_is_found_by_option_then_environment_else_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    toy = tmp_path / "toy.py"
    toy.write_text("")
    assert find_toy(str(toy)) == toy
    monkeypatch.setenv("MEETING_BENCH_TOY", str(toy))
    assert find_toy() == toy
    monkeypatch.setenv("MEETING_BENCH_TOY", str(tmp_path / "gone.py"))
    with pytest.raises(ToyMissing, match=r"gone\.py is not there: pass --toy PATH or set MEETING_BENCH_TOY"):
        find_toy()


def test_a_missing_yardstick_stops_the_suite_before_anything_runs(tmp_path: Path, capsys: Any) -> None:
    assert main(["suite", "--spawn", "--toy", str(tmp_path / "nowhere.py")]) == 2
    assert "nowhere.py is not there" in capsys.readouterr().err


def test_the_cli_defaults() -> None:
    suite = _parser().parse_args(["suite", "--spawn"])
    assert suite.baseline == "toy" and suite.runs == 3 and suite.scale == 1.0 and suite.keys is True
    one = _parser().parse_args(["throughput", "--spawn"])
    assert one.baseline == "none" and one.runs is None and one.keys is True
    assert _parser().parse_args(["throughput", "--spawn", "--no-keys", "--baseline", "toy"]).keys is False
    assert _parser().parse_args(["latency", "--spawn"]).rate == 200.0


def _cpu(**ms_per_op: float) -> dict[str, Any]:
    """A run's CPU figures: ms per operation by group, over a 1 s phase of 1,000 operations."""
    out: dict[str, Any] = {"cpu_per": "message", "cpu_ops": 1000, "cpu_phase_seconds": 1.0, "cpu_cores": 2}
    for group, value in ms_per_op.items():
        out.update({f"cpu_{group}_ms": value * 1000, f"cpu_{group}_ms_per_op": value, f"cpu_{group}_cores": value})
    return out


def test_the_cpu_table_shows_ms_per_operation_cores_used_and_the_ceilings_that_cost_allows() -> None:
    chosen = [e for e in entries() if e.name in ("throughput", "fanout")]
    toy = _cpu(server=0.4, mariadbd=0.2, redis=0.0, sender=0.3, receiver=0.1, machine=1.2, other=0.2)
    ours = _cpu(server=1.2, mariadbd=0.3, redis=0.1, sender=0.3, receiver=0.1, machine=2.0, other=0.0)
    results = {("throughput", "toy"): [_result("delivered_per_second", 2000.0, **toy)],
               ("throughput", "meeting"): [_result("delivered_per_second", 800.0, **ours)],
               ("fanout", "meeting"): [_result("delivered_per_second", 800.0)]}  # no /proc: no CPU figures
    text, _ = report(chosen, results, _args(runs=1))
    header = next(line for line in text.splitlines() if line.startswith("| scenario | side"))
    assert header.split(" | ")[4:11] == ["server", "mariadbd", "redis-server", "sender", "receiver", "other load", "machine busy"]
    [toy_row] = _rows(text, "`throughput` | toy")
    # The toy uses no database or Redis: mariadbd's 0.2 is someone else's, outside its ceiling.
    assert toy_row == ("| `throughput` | toy | message | 1 | 0.4 [0.40] | 0.2 [0.20] | 0 [0.00] | 0.3 [0.30] | 0.1 [0.10] | "
                       "0.2 [0.20] | 1.2 [1.20] | 2,500 | 2,500 |")
    [ours_row] = _rows(text, "`throughput` | meeting")
    assert "| 1.2 [1.20] = 3.0x toy | 0.3 [0.30] |" in ours_row and ours_row.endswith("| 833 | 1,000 |")  # 2 cores / 2 ms
    [blind] = _rows(text, "`fanout` | meeting")
    assert blind == "| `fanout` | meeting | - | n/a |" + " n/a [n/a] |" * 7 + " n/a | n/a |"
    assert not _rows(text, "`fanout` | toy")  # a side that did not run has no row


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU meter reads Linux /proc")
def test_the_cpu_meter_reads_each_process_over_the_phase_only() -> None:
    meter = CpuMeter(os.getpid(), None)  # this process as the server (and, always, the sender)
    started = time.process_time()
    while time.process_time() - started < 0.3:  # CPU spent before the phase is not counted
        pass
    meter.start()
    started = time.process_time()
    while time.process_time() - started < 0.3:
        pass
    meter.stop()
    started = time.process_time()
    while time.process_time() - started < 0.2:  # after the phase: not counted either
        pass
    meter.stop()  # the first stop counts
    figures = meter.figures(100, "message")
    assert 250 <= figures["cpu_sender_ms"] <= 400 and figures["cpu_server_ms"] == figures["cpu_sender_ms"]
    assert figures["cpu_server_ms_per_op"] == pytest.approx(figures["cpu_server_ms"] / 100)
    assert figures["cpu_receiver_ms"] is None  # no receiver process: not measured, not zero
    assert figures["cpu_machine_ms"] >= 0.8 * figures["cpu_sender_ms"] and figures["cpu_other_ms"] >= 0
    assert 0 < figures["cpu_sender_cores"] <= 1.05 and figures["cpu_cores"] >= 1  # one thread: at most a core
