"""The servers a run measures: `meeting` (spawned fresh, with a database and Redis namespace of
its own) and the yardstick, the in-memory toy every performance target is a ratio to."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

TOY_ENV = "MEETING_BENCH_TOY"
# The shared material sits beside the project root (../shared), for people and for CI alike.
TOY_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "yardstick" / "toy_push_server.py"


class ToyMissing(RuntimeError):
    pass


@dataclass
class Server:
    url: str
    pid: int | None  # known when spawned: its RSS can be measured
    proc: asyncio.subprocess.Process | None = None
    dialect: str = "meeting"  # how the client talks to it: see harness.DIALECTS
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    async def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.terminate()
                await asyncio.wait_for(self.proc.wait(), 20)
        finally:
            for cleanup in self.cleanups:
                await asyncio.to_thread(cleanup)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_toy(path: str | None = None) -> Path:
    """--toy PATH, else $MEETING_BENCH_TOY, else ../shared/yardstick/ beside the project root."""
    toy = Path(path or os.environ.get(TOY_ENV) or TOY_DEFAULT)
    if not toy.is_file():
        raise ToyMissing(f"the yardstick {toy} is not there: pass --toy PATH or set {TOY_ENV} "
                         f"(it is ../shared/yardstick/toy_push_server.py beside the project root)")
    return toy


async def spawn_toy(path: Path) -> Server:
    """The toy on a free port, with this interpreter (it needs only aiohttp and PyJWT)."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, str(path), "--port", str(port),
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    server = Server(f"http://127.0.0.1:{port}", proc.pid, proc, dialect="toy")
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                async with http.get(f"{server.url}/health") as r:
                    if r.status == 200:
                        return server
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    await server.stop()
    raise RuntimeError(f"the yardstick {path} did not answer /health within 30 s")


async def spawn_server(env: dict[str, str]) -> Server:
    """`python -m meeting` on a free port; SQLite in a temp dir unless env says otherwise.
    A MariaDB/MySQL URL gets a fresh database and a Redis URL a fresh key prefix for this run
    (both removed afterwards), so no run inherits another's tables, caches or channels, and
    two benches on one machine do not meet. Password hashing is cheapened: the bench measures
    messaging, not argon2. A fresh JWT secret each run, since one is required once Redis is
    configured; no rate limits (a bench user sends far faster than a person may)."""
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="meeting-bench-")
    env = dict(env)
    cleanups: list[Callable[[], None]] = []
    run_tag = secrets.token_hex(4)
    if env.get("MEETING_DATABASE_URL", "").startswith("mysql"):
        env["MEETING_DATABASE_URL"], drop = await asyncio.to_thread(_fresh_mysql, env["MEETING_DATABASE_URL"], run_tag)
        cleanups.append(drop)
    if env.get("MEETING_REDIS_URL"):
        env["MEETING_REDIS_PREFIX"] = f"{env.get('MEETING_REDIS_PREFIX', 'meeting')}-{run_tag}"
        cleanups.append(lambda: _forget_redis(env["MEETING_REDIS_URL"], env["MEETING_REDIS_PREFIX"]))
    full = {**os.environ, "MEETING_DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/bench.db",
            "MEETING_AUTH_HASH_TIME_COST": "1", "MEETING_AUTH_HASH_MEMORY_KIB": "1024",
            "MEETING_LOGGING_LEVEL": "WARNING", "MEETING_PUSH_MAX_CONNECTIONS_PER_USER": "100",
            "MEETING_AUTH_SECRET": secrets.token_urlsafe(48), "MEETING_LIMITS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1", **env}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meeting", "--port", str(port), cwd=workdir, env=full,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc.pid, proc, cleanups=cleanups)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while line := (await asyncio.wait_for(proc.stdout.readline(), 60)).decode():
            lines.append(line)
            if f"127.0.0.1:{port}" in line:
                asyncio.get_running_loop().create_task(_drain(proc))
                return server
    except BaseException:
        await server.stop()
        raise
    await server.stop()
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def _fresh_mysql(url: str, tag: str) -> tuple[str, Callable[[], None]]:
    """A new database `<name>_<tag>` on the server the URL names, and how to drop it."""
    import pymysql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = f"{parsed.database or 'bench'}_{tag}"

    def sql(statement: str) -> None:
        conn = pymysql.connect(host=parsed.host, port=parsed.port or 3306, user=parsed.username,
                               password=parsed.password or "", connect_timeout=5, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    return parsed.set(database=name).render_as_string(hide_password=False), lambda: sql(f"DROP DATABASE IF EXISTS `{name}`")


def _forget_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
    finally:
        client.close()


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass
