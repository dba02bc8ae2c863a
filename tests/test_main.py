"""`python -m meeting` as a newcomer runs it: real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import jwt

from tests.conftest import TEST_SECRET


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETING_")}
    env.update(MEETING_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}", MEETING_AUTH_SECRET=TEST_SECRET,
               MEETING_AUTH_HASH_TIME_COST="1", MEETING_AUTH_HASH_MEMORY_KIB="1024", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


async def _run(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meeting", *args, cwd=tmp_path, env=_env(tmp_path, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_help_explains_serve_and_migrate(tmp_path: Path) -> None:
    code, out = await _run(tmp_path, "--help")
    assert code == 0
    for word in ("migrate", "--config", "--host", "--port", "MEETING_"):
        assert word in out


async def test_migrate_creates_the_schema_and_exits(tmp_path: Path) -> None:
    code, out = await _run(tmp_path, "migrate")
    assert code == 0, out
    with sqlite3.connect(tmp_path / "cli.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "meetings", "meeting_participants", "messages", "message_recipients", "alembic_version"} <= tables


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    code, out = await _run(tmp_path, "migrate", MEETING_DATABASE_POOL_SIZE="lots")
    assert code == 2
    assert "database.pool_size" in out and "Traceback" not in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path, port: int, **env: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m meeting` in `tmp_path` until it printed its address; terminated after."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meeting", "--port", str(port), cwd=tmp_path, env=_env(tmp_path, **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        seen = []
        async def _wait_for_address() -> None:
            assert proc.stdout is not None
            while line := (await proc.stdout.readline()).decode():
                seen.append(line)
                if f"http://127.0.0.1:{port}" in line:
                    return
            raise AssertionError(f"server exited: {''.join(seen)}")
        await asyncio.wait_for(_wait_for_address(), 30)
        yield proc
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)


async def test_serve_on_sqlite_prints_its_address_and_answers(tmp_path: Path) -> None:
    port = _free_port()
    async with _serving(tmp_path, port, MEETING_SERVER_BACKLOG="777") as proc:
        if shutil.which("ss"):  # a listening socket's Send-Q is its accept backlog
            listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
            assert listing.split()[2] == "777", listing
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.post("/auth/register", json={"username": "newcomer", "password": "password123"}) as r:
                assert r.status == 201
            async with http.post("/auth/login", json={"username": "newcomer", "password": "password123"}) as r:
                token = (await r.json())["access_token"]
            async with http.get("/users/me", headers={"Authorization": f"Bearer {token}"}) as r:
                assert (await r.json())["username"] == "newcomer"
            async with http.get("/") as r:  # the web client (docs/frontend.md)
                assert r.status == 200 and r.content_type == "text/html"
                assert '<script type="module" src="/static/app.js">' in await r.text()
            async with http.get("/static/meeting-client.js") as r:
                assert r.status == 200 and "export class MeetingClient" in await r.text()
    assert proc.returncode is not None


async def test_with_no_secret_configured_a_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    """The README's first command: no secret anywhere. The first start writes a random key
    beside the database, readable by its owner only; a restart reads it, so a token issued
    before the restart is still good after it."""
    port = _free_port()
    async with _serving(tmp_path, port, MEETING_AUTH_SECRET=""):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.post("/auth/register", json={"username": "newcomer", "password": "password123"}) as r:
                assert r.status == 201
            async with http.post("/auth/login", json={"username": "newcomer", "password": "password123"}) as r:
                token = (await r.json())["access_token"]
    key_file = tmp_path / "cli.db.secret"
    key = key_file.read_text()
    assert len(key.strip()) >= 32 and key_file.stat().st_mode & 0o777 == 0o600
    async with _serving(tmp_path, port, MEETING_AUTH_SECRET=""):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/users/me", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200 and (await r.json())["username"] == "newcomer"
    assert key_file.read_text() == key
    forged = jwt.encode({"sub": "1", "sid": 1, "iss": "meeting", "aud": "meeting", "iat": 1, "exp": 4102444800},
                        "dev-secret-change-me-0123456789abcdef", algorithm="HS256")  # well formed: only the key is wrong
    async with _serving(tmp_path, port, MEETING_AUTH_SECRET=""):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/users/me", headers={"Authorization": f"Bearer {forged}"}) as r:
                assert r.status == 401  # the formerly shipped secret signs nothing any more


async def test_several_instances_without_a_shared_secret_refuse_to_start(tmp_path: Path) -> None:
    code, out = await _run(tmp_path, "--port", str(_free_port()), MEETING_AUTH_SECRET="", MEETING_REDIS_URL="redis://127.0.0.1:1/0")
    assert code == 2 and "auth.secret: must be set when redis.url is" in out and "token_urlsafe" in out


async def test_a_short_secret_refuses_to_start(tmp_path: Path) -> None:
    code, out = await _run(tmp_path, "--port", str(_free_port()), MEETING_AUTH_SECRET="too-short")
    assert code == 2 and "auth.secret" in out and "too-short" not in out  # never echo a secret


def test_event_loop_is_uvloop_when_installed_and_asyncio_otherwise(monkeypatch: Any) -> None:
    import uvloop

    from meeting.__main__ import _event_loop

    loop = _event_loop()
    assert isinstance(loop, uvloop.Loop)
    loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if the extra were not installed
    loop = _event_loop()
    assert not isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
    loop.close()
