"""deploy/nginx.conf in front of two real instances: HTTP, WebSocket upgrade, no token in its log."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import shutil
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from tests.conftest import unavailable
from tests.helpers import Device
from tests.test_main import _free_port
from tests.test_processes import Instance, _send, _user, heartbeat, instances  # noqa: F401  (the fixtures)

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
            .replace("worker_connections 16384;", "worker_connections 1024;")
            .replace("limit_conn sockets 100;", "limit_conn sockets 6;")   # small enough to reach in a test
            .replace("zone=sends burst=100", "zone=sends burst=10")
            .replace("max_fails=3", "max_fails=0"))  # a dead instance keeps getting tried: its failures keep being logged
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
    yield url, prefix / "logs"
    proc.terminate()
    await asyncio.wait_for(proc.wait(), 10)


async def test_http_and_websockets_through_nginx(proxy: tuple[str, Path]) -> None:
    url, logs = proxy
    access_log = logs / "access.log"
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


async def test_nginx_limits_answer_json_429_and_hide_its_version(proxy: tuple[str, Path]) -> None:
    url, _ = proxy
    async with aiohttp.ClientSession(url) as http:
        alice = await _user(http, "alice")
        async with http.get("/healthz") as r:
            assert r.headers["Server"] == "nginx"  # server_tokens off: no version
        async with http.get("/metrics") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.post("/messages", data=io.BytesIO(b"x" * (1024 * 1024 + 1)), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"

        async def status(method: str, path: str, **kwargs: object) -> tuple[int, str, str | None]:
            async with http.request(method, path, **kwargs) as r:
                return r.status, r.content_type, r.headers.get("Retry-After")

        logins = await asyncio.gather(*(status("POST", "/auth/login", json={"username": "alice", "password": "nope"})
                                        for _ in range(60)))
        assert {s for s, _, _ in logins} == {401, 429}  # 5 r/s with a burst of 20: the rest are refused
        assert all(t == "application/json" and ra == "1" for s, t, ra in logins if s == 429)
        sends = await asyncio.gather(*(status("POST", "/messages", json={"recipient_ids": [alice["id"]], "content": "x"},
                                              headers={"Authorization": f"Bearer {alice['token']}"}) for _ in range(60)))
        assert {s for s, _, _ in sends} == {201, 429}
        reads = await asyncio.gather(*(status("GET", "/messages", headers={"Authorization": f"Bearer {alice['token']}"})
                                       for _ in range(60)))
        assert {s for s, _, _ in reads} == {200}  # only POSTs count against sends
        sockets = [await http.ws_connect("/ws/messages", params={"token": alice["token"]}) for _ in range(6)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect("/ws/messages", params={"token": alice["token"]})
        assert refused.value.status == 429
        for ws in sockets:
            await ws.close()


async def test_nginx_error_log_never_records_a_websocket_token(proxy: tuple[str, Path], instances: list[Instance]) -> None:
    url, logs = proxy
    async with aiohttp.ClientSession(url) as http:
        bob = await _user(http, "bob")
    instances[0].proc.send_signal(signal.SIGKILL)  # an upstream that refuses connections
    await asyncio.wait_for(instances[0].proc.wait(), 10)
    # A new connection per request (so both nginx workers serve some), round robin among
    # equals: about half of these try the dead instance first, then the live one.
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(8):
            ws = await http.ws_connect("/ws/messages", params={"token": bob["token"]})
            await ws.close()
        for _ in range(8):
            async with http.get("/healthz") as r:
                assert r.status == 200
    errors = (logs / "error.log").read_text()
    assert "while connecting to upstream" in errors  # the REST requests' failed attempts are logged
    assert bob["token"] not in errors and "token=" not in errors and "/ws/messages" not in errors
