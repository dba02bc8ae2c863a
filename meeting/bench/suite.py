"""`python -m meeting.bench suite`: every scenario at its default sizes, N runs each, and
the table for docs/performance.md (median of the runs, with their range).

Each run starts its own server with --spawn, so one run's connections or data do
not weigh on the next one's memory reading.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
from typing import Any, Awaitable, Callable

from .scenarios import check

SCENARIOS = ("conns", "latency", "throughput", "fanout", "reconnect")
# scenario -> (headline metric, its unit, target as written, is it met, other metrics shown)
HEADLINES: dict[str, tuple[str, str, str, Callable[[float], bool], tuple[str, ...]]] = {
    "conns": ("kib_per_connection", "KiB server RSS per connection", "<= 20 KB (19.5 KiB)", lambda v: v * 1024 <= 20_000,
              ("connects_per_second", "handshake_p99_ms", "answered_ping")),
    "latency": ("delivery_p99_ms", "ms delivery p99 at 500 msg/s", "<= 15 ms", lambda v: v <= 15,
                ("delivery_p50_ms", "delivery_max_ms", "post_p99_ms")),
    "throughput": ("delivered_per_second", "msg/s stored and delivered", ">= 1,500", lambda v: v >= 1500,
                   ("post_p50_ms", "delivery_p99_ms")),
    "fanout": ("delivered_per_second", "frames/s", ">= 15,000", lambda v: v >= 15_000, ("delivery_p99_ms", "post_p50_ms")),
    "reconnect": ("all_backlogs_seconds", "s until every backlog is in", "<= 5 s", lambda v: v <= 5, ()),
}


async def run_suite(args: argparse.Namespace, run_one: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> str:
    target = ["--url", args.url] if args.url else ["--spawn", *[f"--env={kv}" for kv in args.env]]
    results: dict[str, list[dict[str, Any]]] = {}
    for scenario in args.scenarios or SCENARIOS:
        for i in range(args.runs):
            result = await run_one([scenario, *target, "--json", *([] if args.keys or scenario == "conns" else ["--no-keys"])])
            result.pop("_delivery_seconds", None)
            print(f"# {scenario} run {i + 1}/{args.runs}: {result[HEADLINES[scenario][0]]} {HEADLINES[scenario][1]}",
                  file=sys.stderr)
            results.setdefault(scenario, []).append(result)
    return table(results, args)


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    env = dict(kv.split("=", 1) for kv in args.env)
    backend = "MariaDB + Redis" if "mysql" in env.get("MEETING_DATABASE_URL", "") and env.get("MEETING_REDIS_URL") else (
        "SQLite, no Redis" if not env.get("MEETING_DATABASE_URL") and not env.get("MEETING_REDIS_URL") else "custom")
    keys = "every send with an Idempotency-Key" if args.keys else "sends without Idempotency-Key"
    lines = [f"{dt.date.today().isoformat()}, commit {_commit()}, {backend}, {os.cpu_count()} cores, {keys}, "
             f"median of {args.runs} run(s) (range in brackets)", "",
             "| scenario | result | target | met | also (medians) | lost / doubled |", "|---|---|---|---|---|---|"]
    for scenario, runs in results.items():
        key, unit, target, met, extras = HEADLINES[scenario]
        values = [float(r[key]) for r in runs]
        median = statistics.median(values)
        also = ", ".join(f"{name} {_fmt(statistics.median(float(r[name]) for r in runs))}" for name in extras)
        lost = sum(int(r["lost"]) for r in runs)
        doubled = sum(int(r["duplicated"]) for r in runs)
        lines.append(f"| `{scenario}` | **{_fmt(median)}** {unit} [{_fmt(min(values))}-{_fmt(max(values))}] | {target} | "
                     f"{'yes' if met(median) else 'no'} | {also} | {lost} / {doubled} |")
    for runs in results.values():
        for result in runs:
            check(result)
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}".rstrip("0").rstrip(".")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
