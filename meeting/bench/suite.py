"""`python -m meeting.bench suite`: issue 12's scenarios, N runs each, against `meeting` and the
yardstick (../shared/yardstick/toy_push_server.py) in the same run, and one Markdown table:
both medians (with their range), the ratio, the target and whether it is met.

Targets are ratios to the yardstick because this machine's speed drifts by a third from day to
day; an absolute number measured on Monday says little on Tuesday. Runs alternate toy, meeting,
toy, meeting... so drift during the run weighs on both alike, and each run starts its own
server (and, with --spawn, its own database), so no run inherits another's data or sockets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .cpu_table import cpu_table, run_line
from .scenarios import LostOrDoubled, check

Met = Callable[[float, "float | None"], "bool | None"]  # (meeting, toy or None) -> met; None: cannot tell


@dataclass(frozen=True)
class Headline:
    label: str  # what the row measures, with its unit
    key: str  # the scenario result's key
    target: str  # as issue 12 writes it
    met: Met
    extras: tuple[str, ...] = ()  # more result keys shown in the notes, both sides


@dataclass(frozen=True)
class Entry:
    name: str
    scenario: str
    kwargs: dict[str, Any]
    headlines: tuple[Headline, ...]
    note: str = ""  # what the yardstick cannot do in this scenario, and what is measured instead


def _ratio_at_least(x: float) -> Met:
    return lambda m, t: None if t is None else m >= x * t


def _ratio_at_most(x: float) -> Met:
    return lambda m, t: None if t is None else m <= x * t


NO_SYNC = "toy: no `seq`/`message.synced`; its single `message.unread` ends its sync"


def headlines(scenario: str, kwargs: dict[str, Any], memory: bool = True) -> tuple[Headline, ...]:
    """The rows a scenario reports, with issue 12's targets where the issue gives one."""
    if scenario == "latency":
        rate = kwargs["rate"]
        label = f"latency, open loop {rate:,.0f} msg/s, {kwargs['users']:,} users, 1 recipient: delivery p99 (ms)"
        extras = ("delivery_p50_ms", "delivery_max_ms")
        if rate == 200:
            return (Headline(label, "delivery_p99_ms", "<= 5 ms and <= 2x toy",
                             lambda m, t: False if m > 5 else (None if t is None else m <= 2 * t), extras),)
        if rate == 1000:
            return (Headline(label, "delivery_p99_ms", "<= 15 ms, no loss (toy beside it)", lambda m, t: m <= 15, extras),)
        return (Headline(label, "delivery_p99_ms", "none at this rate", lambda m, t: None, extras),)
    if scenario == "throughput":
        return (Headline(f"throughput: {kwargs['users']:,} users, {kwargs['concurrency']} senders, 1 recipient: msgs/s",
                         "delivered_per_second", ">= 1.0x toy", _ratio_at_least(1.0), ("post_p50_ms",)),)
    if scenario == "fanout":
        return (Headline(f"fanout: {kwargs['users']:,} users x {kwargs['devices']} devices, {kwargs['recipients']} recipients, "
                         f"{kwargs['concurrency']} senders: frames/s", "delivered_per_second", ">= 1.0x toy",
                         _ratio_at_least(1.0), ("delivery_p99_ms",)),)
    if scenario == "conns":
        sockets = f"{kwargs['connections']:,} sockets ({kwargs['users']:,} users)"
        rows = (Headline(f"connect storm, {sockets}: connects/s", "connects_per_second", ">= 1.0x toy",
                         _ratio_at_least(1.0), ("handshake_p50_ms", "handshake_p99_ms")),)
        if memory:
            rows += (Headline(f"server memory per connection at {kwargs['connections']:,} sockets (KiB)", "kib_per_connection",
                              "<= 15 KiB (toy's reported)", lambda m, t: m <= 15),)
        return rows
    if scenario == "reconnect":
        return (Headline(f"reconnect: {kwargs['users']:,} users x {kwargs['backlog']} unread, all synced (s)",
                         "all_backlogs_seconds", "<= 1.5x toy", _ratio_at_most(1.5)),)
    raise ValueError(scenario)


NOTES = {"latency": NO_SYNC, "throughput": NO_SYNC, "fanout": NO_SYNC,
         "conns": "toy: `connected` + `message.unread` from memory; meeting: + sync point from the database, `message.synced`",
         "reconnect": "toy: backlog from memory in one `message.unread`; meeting: from the database, paged, then `message.synced`"}


def entries(scale: float = 1.0) -> list[Entry]:
    """Issue 12's table at its sizes times `scale` (never below what the scenario needs)."""
    def n(base: int, floor: int) -> int:
        return max(floor, round(base * scale))

    duration = max(0.2, 10.0 * scale)
    plan = [
        ("latency200", "latency", {"users": n(1000, 10), "rate": 200.0, "duration": duration}),
        ("latency1000", "latency", {"users": n(1000, 10), "rate": 1000.0, "duration": duration}),
        ("throughput", "throughput", {"users": n(200, 4), "messages": n(10_000, 20), "concurrency": n(32, 2)}),
        ("fanout", "fanout", {"users": n(1000, 12), "devices": 2, "recipients": n(100, 3), "messages": n(200, 5),
                              "concurrency": n(8, 2)}),
        ("connect5k", "conns", {"connections": n(5000, 20), "users": n(1000, 4)}),
        ("connect10k", "conns", {"connections": n(10_000, 40), "users": n(2000, 8)}),
        ("reconnect", "reconnect", {"users": n(2000, 10), "backlog": 20, "group": 10}),
    ]
    return [Entry(name, scenario, kwargs, headlines(scenario, kwargs, memory=name != "connect5k"), NOTES[scenario])
            for name, scenario, kwargs in plan]


ENTRY_NAMES = tuple(e.name for e in entries())
RunOne = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (side, scenario, kwargs) -> result


async def run_entries(chosen: list[Entry], sides: tuple[str, ...], runs: int,
                      run_one: RunOne) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every entry `runs` times on each side, the sides alternating run by run."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in chosen:
        for i in range(runs):
            for side in sides:
                began = time.monotonic()
                result = await run_one(side, entry.scenario, entry.kwargs)
                result.pop("_delivery_seconds", None)
                figures = ", ".join(f"{h.key} {result.get(h.key)}" for h in entry.headlines)
                print(f"# {entry.name} run {i + 1}/{runs} {side}: {figures}, lost {result['lost']}, "
                      f"doubled {result['duplicated']} ({time.monotonic() - began:.0f} s); {run_line(result)}",
                      file=sys.stderr, flush=True)
                results.setdefault((entry.name, side), []).append(result)
    return results


def table(chosen: list[Entry], results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The Markdown table; raises LostOrDoubled (after it is built: see `report`) if a run lost
    or doubled a copy on either side."""
    has_toy = any(side == "toy" for _, side in results)
    lines = [_heading(args, has_toy), "",
             "| scenario | yardstick (toy) | meeting | ratio (meeting / toy) | target | met | lost / doubled (toy; meeting) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in chosen:
        toy_runs, ours = results.get((entry.name, "toy"), []), results.get((entry.name, "meeting"), [])
        if not ours:
            continue
        ledger = f"{_ledger(toy_runs)}; {_ledger(ours)}" if toy_runs else f"-; {_ledger(ours)}"
        for headline in entry.headlines:
            m, m_cell = _figure(ours, headline.key)
            t, t_cell = _figure(toy_runs, headline.key) if toy_runs else (None, "-")
            if m is None:
                continue
            ratio = f"{m / t:.2f}x" if t else "-"
            met = headline.met(m, t)
            extras = "; ".join(f"{key}: " + (f"toy {_median_cell(toy_runs, key)}, " if toy_runs else "")
                               + f"meeting {_median_cell(ours, key)}" for key in headline.extras)
            notes = "; ".join(x for x in (extras, entry.note if toy_runs else "") if x)
            lines.append(f"| {headline.label} | {t_cell} | {m_cell} | {ratio} | {headline.target} | "
                         f"{'n/a' if met is None else 'yes' if met else '**no**'} | {ledger} | {notes} |")
    return "\n".join(lines)


def report(chosen: list[Entry], results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> tuple[str, str | None]:
    """The tables (results, then CPU), and what was lost or doubled (None when nothing): a
    benchmark that lost a copy has no result."""
    sides = ("toy", "meeting")
    cpu = cpu_table([(f"`{e.name}`", side, results.get((e.name, side), [])) for e in chosen for side in sides],
                    dict(kv.split("=", 1) for kv in args.env), _fmt)
    text = f"{table(chosen, results, args)}\n\n{cpu}"
    problems = []
    for (name, side), runs in results.items():
        for result in runs:
            try:
                check(result)
            except LostOrDoubled as exc:
                problems.append(f"{side} {name}: {exc}")
    return text, "; ".join(problems) or None


def _figure(runs: list[dict[str, Any]], key: str) -> tuple[float | None, str]:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    if not values:
        return None, "-"
    median = statistics.median(values)
    spread = f" [{_fmt(min(values))}-{_fmt(max(values))}]" if len(values) > 1 else ""
    return median, f"**{_fmt(median)}**{spread}"


def _median_cell(runs: list[dict[str, Any]], key: str) -> str:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return _fmt(statistics.median(values)) if values else "-"


def _ledger(runs: list[dict[str, Any]]) -> str:
    return f"{sum(int(r['lost']) for r in runs)} / {sum(int(r['duplicated']) for r in runs)}"


def _heading(args: argparse.Namespace, has_toy: bool) -> str:
    env = dict(kv.split("=", 1) for kv in args.env)
    backend = "MariaDB + Redis" if "mysql" in env.get("MEETING_DATABASE_URL", "") and env.get("MEETING_REDIS_URL") else (
        "SQLite, no Redis" if not env.get("MEETING_DATABASE_URL") and not env.get("MEETING_REDIS_URL") else "custom backend")
    keys = "every send with an Idempotency-Key" if args.keys else "sends without Idempotency-Key"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    scale = f", sizes x{args.scale:g}" if getattr(args, "scale", 1.0) != 1.0 else ""
    sides = "toy and meeting alternating, each run on a fresh server" if has_toy else "meeting only (no yardstick)"
    commit = getattr(args, "commit", None) or current_commit()
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, meeting on {backend}, {os.cpu_count()} cores, "
            f"load average {load} at the end, {keys}, median of {args.runs} run(s) [range]{scale}, {sides}")


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") if abs(value) >= 1 else f"{value:.2g}"


def current_commit() -> str:
    """The code under test; taken when a run starts (a commit made while it runs is not what ran)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
