"""`python -m meeting` serves; `python -m meeting migrate` applies the schema and exits.
`--workers N` runs N serving processes on one port under a supervisor (meeting.workers)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys

from aiohttp import web

from .config import ConfigError, load_config, with_overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meeting",
        description="Meeting Assistant backend. With no command, serve HTTP and WebSockets; "
        "`migrate` applies the database migrations and exits. Every setting can also be "
        "given as an environment variable MEETING_<SECTION>_<KEY>, e.g. MEETING_DATABASE_URL.",
    )
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve",
                        help="serve (default): run the server; migrate: upgrade the database schema and exit")
    parser.add_argument("--config", metavar="PATH", help="YAML config file (default: ./config.yaml if present)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="run N server processes on the same port (SO_REUSEPORT), restarted if they die; "
                        "N > 1 needs redis.url (the workers are instances like any other)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    return parser


async def _migrate(config) -> None:  # type: ignore[no-untyped-def]
    from .db import create_engine, migrate

    engine = create_engine(config.database)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"meeting: configuration error: {exc}", file=sys.stderr)
        return 2
    server = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if server:
        config = with_overrides(config, server=server)
    who = "" if args.worker is None else f"worker {args.worker} "
    logging.basicConfig(level=config.logging.level, format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    if args.command == "migrate":
        asyncio.run(_migrate(config))
        return 0
    if args.workers is not None and args.worker is None:
        return _supervise(args, config, argv if argv is not None else sys.argv[1:])
    from .web import AccessLogger, create_app

    try:
        app = create_app(config)
    except ConfigError as exc:
        print(f"meeting: configuration error: {exc}", file=sys.stderr)
        return 2
    _tune_gc(config.server.gc_young_threshold)
    if args.worker is not None:
        from .workers import orphan_watch

        app.cleanup_ctx.append(orphan_watch(os.getppid()))
    web.run_app(app, host=config.server.host, port=config.server.port, backlog=config.server.backlog,
                access_log_class=AccessLogger, shutdown_timeout=config.server.shutdown_timeout, loop=_event_loop(),
                reuse_port=args.worker is not None)
    return 0


def _tune_gc(young_threshold: int) -> None:
    """Fewer, cheaper cyclic collections. A connect storm allocates tens of objects per
    device that live as long as its socket (aiohttp's request, protocol and WebSocket), so
    at Python's default thresholds every tenth middle collection became a full one over
    all of them: a 5,000-socket storm spent 28 % of its CPU in the collector, 6 full
    collections of ~150 ms. Everything that exists once the app is built lives as long as
    the process: frozen, no collection looks at it again; and the youngest generation is
    collected every `server.gc_young_threshold` allocations (net, of container objects)
    instead of 700: at the default 10,000 the older ones fill 14 times more slowly
    (reference counting frees all but cyclic garbage anyway)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, *gc.get_threshold()[1:])


def _supervise(args: argparse.Namespace, config, argv: list[str]) -> int:  # type: ignore[no-untyped-def]
    from .workers import supervise

    if args.workers < 1:
        print("meeting: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not config.redis.url:
        print(f"meeting: --workers {args.workers} needs redis.url (MEETING_REDIS_URL): each worker is an instance of "
              "its own, and without Redis a message reaches only the devices connected to the worker that stored it. "
              "Configure Redis (and auth.secret, shared by every worker), or run one worker.", file=sys.stderr)
        return 2
    if args.workers > 1 and config.database.url.startswith("sqlite"):
        print(f"meeting: --workers {args.workers} needs MariaDB/MySQL (database.url, MEETING_DATABASE_URL), not SQLite: "
              "an in-memory SQLite database would be a different database in each worker (same user ids, one secret: "
              "one user's token would open another's account), and a SQLite file is written by one process at a "
              "time, so the workers would queue on its lock. Use MariaDB, or run one worker.", file=sys.stderr)
        return 2
    from .signing import resolve

    try:  # a bad secret stops the supervisor now, not each worker in a restart loop
        resolve(config)  # (and a first start's generated key exists before any worker reads it)
    except ConfigError as exc:
        print(f"meeting: configuration error: {exc}", file=sys.stderr)
        return 2
    worker_argv = _without_workers(argv)
    logging.getLogger(__name__).info("supervising %d worker(s) on %s:%d", args.workers, config.server.host, config.server.port)
    return supervise(args.workers, worker_argv, config.server.shutdown_timeout, _event_loop)


def _without_workers(argv: list[str]) -> list[str]:
    """The supervisor's own arguments, minus --workers: what each worker is started with."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (`pip install -e '.[speed]'`), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    logging.getLogger(__name__).info("event loop: uvloop %s", uvloop.__version__)
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
