"""python -m meeting.bench SCENARIO [--url URL | --spawn] [sizes] [--baseline toy] [--json]

Scenarios: conns (idle connections held, memory per connection), latency (open-loop rate, delivery p50-p99), throughput (C concurrent
senders, stored-and-delivered per second), fanout (messages to many recipients with two
devices each, frames per second), reconnect (everyone reconnects to an unread backlog at
once). Receiving devices run in a separate process. `--baseline toy` runs the same client
against the yardstick (../shared/yardstick/toy_push_server.py) too, alternating, and prints
both with their ratio; `suite` does that for every scenario of issue 12.
Every run counts lost and duplicated copies and exits non-zero if there is any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from .scenarios import LostOrDoubled, check, conns, fanout, latency, reconnect, throughput
from .servers import Server, ToyMissing, find_toy, spawn_server, spawn_toy
from .suite import ENTRY_NAMES, NOTES, Entry, RunOne, current_commit, entries, headlines, report, run_entries

SIZES = {"conns": ("connections", "users"), "latency": ("users", "rate", "duration"),
         "throughput": ("users", "messages", "concurrency"), "fanout": ("users", "devices", "recipients", "messages", "concurrency"),
         "reconnect": ("users", "backlog", "group")}
FUNCTIONS = {"conns": conns, "latency": latency, "throughput": throughput, "fanout": fanout, "reconnect": reconnect}


def _target(cmd: argparse.ArgumentParser, baseline: str) -> None:
    target = cmd.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (no memory reading for conns)")
    target.add_argument("--spawn", action="store_true",
                        help="a fresh `python -m meeting` for every run (SQLite in a temp dir unless --env says otherwise; "
                             "a MariaDB URL gets a fresh database, a Redis URL a fresh key prefix)")
    cmd.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for --spawn (repeatable)")
    cmd.add_argument("--baseline", choices=("toy", "none"), default=baseline,
                     help=f"run the yardstick too, alternating with meeting, and print both and the ratio (default {baseline})")
    cmd.add_argument("--toy", metavar="PATH", help="the yardstick (default: $MEETING_BENCH_TOY, else "
                                                   "../shared/yardstick/toy_push_server.py beside the project root)")
    cmd.add_argument("--no-keys", dest="keys", action="store_false",
                     help="send without an Idempotency-Key (by default every send has one, as clients should)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meeting.bench", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in ("conns", "latency", "throughput", "fanout", "reconnect"):
        cmd = sub.add_parser(name)
        _target(cmd, "none")
        cmd.add_argument("--runs", type=int, default=None, help="runs per side (default 3 with --baseline toy, else 1)")
        cmd.add_argument("--json", action="store_true", help="print one JSON line instead of a table (without --baseline)")
        if name != "conns" and name != "reconnect":
            cmd.add_argument("--plot", metavar="FILE.png", help="draw the delivery-latency distribution (needs matplotlib)")
        if name == "conns":
            cmd.add_argument("--connections", type=int, default=10_000)
            cmd.add_argument("--users", type=int, default=2000)
        elif name == "latency":
            cmd.add_argument("--users", type=int, default=1000)
            cmd.add_argument("--rate", type=float, default=200.0, help="messages per second, open loop")
            cmd.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
        elif name == "throughput":
            cmd.add_argument("--users", type=int, default=200)
            cmd.add_argument("--messages", type=int, default=10_000)
            cmd.add_argument("--concurrency", type=int, default=32)
        elif name == "fanout":
            cmd.add_argument("--users", type=int, default=1000)
            cmd.add_argument("--devices", type=int, default=2, help="devices per user")
            cmd.add_argument("--recipients", type=int, default=100, help="recipients per message")
            cmd.add_argument("--messages", type=int, default=200)
            cmd.add_argument("--concurrency", type=int, default=8)
        else:
            cmd.add_argument("--users", type=int, default=2000)
            cmd.add_argument("--backlog", type=int, default=20, help="unread messages per user")
            cmd.add_argument("--group", type=int, default=10, help="recipients of each backlog message (<= 1000)")
    suite = sub.add_parser("suite", help="every scenario of issue 12 against meeting and the yardstick: the results table")
    _target(suite, "toy")
    suite.add_argument("--runs", type=int, default=3, help="runs per scenario and side (the table shows the median and range)")
    suite.add_argument("--scale", type=float, default=1.0, help="every size times this (e.g. 0.1 for a quick look)")
    suite.add_argument("--scenario", dest="scenarios", action="append", choices=ENTRY_NAMES, help="only these (repeatable)")
    return parser


def runner(args: argparse.Namespace, toy: Path | None, progress: Any = lambda n: None) -> RunOne:
    """How one run of one side goes: its own server, the scenario, the server stopped."""
    env = dict(kv.split("=", 1) for kv in args.env)

    async def run_one(side: str, scenario: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if side == "toy":
            assert toy is not None
            server = await spawn_toy(toy)
        else:
            server = Server(args.url, None) if args.url else await spawn_server(env)
        try:
            if scenario == "conns":
                return await conns(server.url, **kwargs, server_pid=server.pid, progress=progress, dialect=server.dialect)
            return await FUNCTIONS[scenario](server.url, **kwargs, server_pid=server.pid, progress=progress, keys=args.keys,
                                             dialect=server.dialect)
        finally:
            await server.stop()

    return run_one


def side_by_side(args: argparse.Namespace, chosen: list[Entry], runs: int) -> int:
    try:
        toy = find_toy(args.toy) if args.baseline == "toy" else None
    except ToyMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sides = ("toy", "meeting") if toy else ("meeting",)
    args.commit = current_commit()
    results = asyncio.run(run_entries(chosen, sides, runs, runner(args, toy)))
    text, problems = report(chosen, results, args)
    print(text)
    if problems:
        print(f"FAILED: {problems}", file=sys.stderr)
        return 1
    return 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One run of one scenario against meeting, with a progress bar."""
    kwargs = {name: getattr(args, name) for name in SIZES[args.scenario]}
    return await runner(args, None, _progress_bar(args))("meeting", args.scenario, kwargs)


def _progress_bar(args: argparse.Namespace) -> Any:
    total = {"latency": lambda: int(args.rate * args.duration), "reconnect": lambda: args.users * args.backlog,
             "conns": lambda: args.connections}.get(
        args.scenario, lambda: args.messages)()
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, desc=f"{args.scenario}: sending", unit="msg", disable=args.json or not sys.stderr.isatty())
    return bar.update


def plot(samples: list[float], title: str, path: str) -> None:
    """A histogram of delivery latency with p50/p99 marked (matplotlib: `pip install -e '.[bench]'`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import percentile

    ms = [s * 1000 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(ms, bins=100, color="#4477aa")
    for p, style in ((50, "--"), (99, ":")):
        value = percentile(ms, p)
        ax.axvline(value, color="black", linestyle=style, label=f"p{p} = {value:.1f} ms")
    ax.set_xlabel("delivery latency (POST start to frame received), ms")
    ax.set_ylabel("messages")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.scenario == "suite":
        chosen = [e for e in entries(args.scale) if not args.scenarios or e.name in args.scenarios]
        return side_by_side(args, chosen, args.runs)
    if args.baseline == "toy" or (args.runs or 1) > 1:  # a table of medians, against the toy or not
        kwargs = {name: getattr(args, name) for name in SIZES[args.scenario]}
        entry = Entry(args.scenario, args.scenario, kwargs, headlines(args.scenario, kwargs), NOTES[args.scenario])
        args.scale = 1.0
        return side_by_side(args, [entry], args.runs or 3)
    result = asyncio.run(run(args))
    samples = result.pop("_delivery_seconds", [])
    if getattr(args, "plot", None):
        plot(samples, f"{args.scenario}: {len(samples)} deliveries", args.plot)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    try:
        check(result)
    except LostOrDoubled as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
