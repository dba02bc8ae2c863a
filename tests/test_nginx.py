"""deploy/nginx.conf in front of two real instances: HTTP, WebSocket upgrade, no token in its log."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from tests.conftest import unavailable
from tests.helpers import Device
from tests.test_main import _free_port
from tests.test_processes import Instance, _send, _user, instances  # noqa: F401  (the fixture)

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


@pytest.fixture
async def proxy(instances: list[Instance], tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        unavailable("nginx is not installed (apt-get install nginx-light)")
    port = _free_port()
    conf = (CONFIG.read_text()
            .replace("127.0.0.1:8081", f"127.0.0.1:{instances[0].port}")
            .replace("127.0.0.1:8082", f"127.0.0.1:{instances[1].port}")
            .replace("listen 8080;", f"listen 127.0.0.1:{port};")
            .replace("worker_connections 16384;", "worker_connections 1024;"))
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "nginx.conf").write_text(conf)
    directives = f"daemon off; pid {prefix}/nginx.pid;" + (" user root;" if os.geteuid() == 0 else "")
    proc = await asyncio.create_subprocess_exec(nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr",
                                                "-g", directives, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    async def up() -> None:
        while True:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                if proc.returncode is not None:
                    raise AssertionError((await proc.stderr.read()).decode()) from None  # type: ignore[union-attr]
                await asyncio.sleep(0.05)

    await asyncio.wait_for(up(), 15)
    yield url, prefix / "logs" / "access.log"
    proc.terminate()
    await asyncio.wait_for(proc.wait(), 10)


async def test_http_and_websockets_through_nginx(proxy: tuple[str, Path]) -> None:
    url, access_log = proxy
    async with aiohttp.ClientSession(url) as http:
        alice, bob = await _user(http, "alice"), await _user(http, "bob")
        devices = [Device(await http.ws_connect("/ws/messages", params={"token": bob["token"]})).pump() for _ in range(4)]
        for device in devices:
            await device.handshake()
        await _send(http, alice, bob, "через nginx 🚀")
        for device in devices:  # least_conn spread them over both instances
            payload = await device.expect("message.new")
            assert payload["content"] == "через nginx 🚀" and payload["seq"] == 1

    async def logged() -> str:  # nginx writes a WebSocket's line when it closes
        while '"GET /ws/messages" 101' not in (log := access_log.read_text()):
            await asyncio.sleep(0.02)
        return log

    log = await asyncio.wait_for(logged(), 10)
    assert bob["token"] not in log and "token=" not in log
