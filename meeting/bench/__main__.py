"""python -m meeting.bench SCENARIO [--url URL | --spawn] [sizes] [--json]

Scenarios: conns (idle connections held, memory per connection), latency (open-loop rate, delivery p50-p99), throughput (C concurrent
senders, stored-and-delivered per second), fanout (messages to many recipients with two
devices each, frames per second), reconnect (everyone reconnects to an unread backlog at
once). Receiving devices run in a separate process.
Every run counts lost and duplicated copies and exits non-zero if there is any.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .harness import Server, spawn_server
from .scenarios import LostOrDoubled, check, conns, fanout, latency, reconnect, throughput
from .suite import SCENARIOS, run_suite


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meeting.bench", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in ("conns", "latency", "throughput", "fanout", "reconnect"):
        cmd = sub.add_parser(name)
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
        target.add_argument("--spawn", action="store_true", help="start `python -m meeting` (SQLite unless --env says otherwise)")
        cmd.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for --spawn (repeatable)")
        cmd.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
        if name != "conns" and name != "reconnect":
            cmd.add_argument("--plot", metavar="FILE.png", help="draw the delivery-latency distribution (needs matplotlib)")
        if name != "conns":
            cmd.add_argument("--no-keys", dest="keys", action="store_false",
                             help="send without an Idempotency-Key (by default every send has one, as clients should)")
        if name == "conns":
            cmd.add_argument("--connections", type=int, default=10_000)
            cmd.add_argument("--users", type=int, default=2000)
        elif name == "latency":
            cmd.add_argument("--users", type=int, default=1000)
            cmd.add_argument("--rate", type=float, default=500.0, help="messages per second, open loop")
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
    suite = sub.add_parser("suite", help="every scenario at default sizes, --runs times each: the results table")
    target = suite.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (no memory reading for conns)")
    target.add_argument("--spawn", action="store_true", help="a fresh server for every run")
    suite.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for --spawn (repeatable)")
    suite.add_argument("--runs", type=int, default=3)
    suite.add_argument("--no-keys", dest="keys", action="store_false", help="sends without an Idempotency-Key")
    suite.add_argument("--scenario", dest="scenarios", action="append", choices=SCENARIOS, help="only these (repeatable)")
    return parser


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args.url, None) if args.url else await spawn_server(dict(kv.split("=", 1) for kv in args.env))
    try:
        progress = _progress_bar(args)
        if args.scenario == "conns":
            return await conns(server.url, args.connections, args.users, server.pid, progress=progress)
        if args.scenario == "latency":
            return await latency(server.url, args.users, args.rate, args.duration, progress=progress, keys=args.keys)
        if args.scenario == "throughput":
            return await throughput(server.url, args.users, args.messages, args.concurrency, progress=progress, keys=args.keys)
        if args.scenario == "fanout":
            return await fanout(server.url, args.users, args.devices, args.recipients, args.messages, args.concurrency,
                                progress=progress, keys=args.keys)
        return await reconnect(server.url, args.users, args.backlog, args.group, progress=progress, keys=args.keys)
    finally:
        await server.stop()


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
        try:
            print(asyncio.run(run_suite(args, lambda argv: run(_parser().parse_args(argv)))))
        except LostOrDoubled as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        return 0
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
