"""`python -m meeting` serves; `python -m meeting migrate` applies the schema and exits."""

from __future__ import annotations

import argparse
import asyncio
import logging
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
    logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    if args.command == "migrate":
        asyncio.run(_migrate(config))
        return 0
    from .web import AccessLogger, create_app

    try:
        app = create_app(config)
    except ConfigError as exc:
        print(f"meeting: configuration error: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=config.server.host, port=config.server.port, backlog=config.server.backlog,
                access_log_class=AccessLogger, shutdown_timeout=config.server.shutdown_timeout, loop=_event_loop())
    return 0


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
