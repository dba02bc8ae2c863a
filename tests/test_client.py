"""`python -m meeting.client listen` against a live test server, as a person would run it."""

from __future__ import annotations

import asyncio
import json
import io
import socket
import sys
from typing import Any

from aiohttp import web

from meeting.client import fetch, send
from tests.helpers import Api


async def test_listen_prints_connected_backlog_and_live_frames(api: Api) -> None:
    alice, bob = await api.users(2)
    await api.send(alice, [bob], "waiting for you")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meeting.client", "listen", "--url", str(api.client.make_url("")).rstrip("/"),
        "--username", bob.username, "--password", "correct horse", "--max-frames", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None

    async def frame() -> dict:
        return json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))

    try:
        assert (await frame())["type"] == "connected"
        backlog = await frame()
        assert backlog["type"] == "message.unread" and backlog["payload"]["messages"][0]["content"] == "waiting for you"
        assert (await frame())["type"] == "message.synced"
        await api.send(alice, [bob], "live 🎧")
        live = await frame()
        assert live["type"] == "message.new" and live["payload"]["content"] == "live 🎧"
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_send_with_a_key_stores_once_however_often_it_is_run(api: Api) -> None:
    alice, bob = await api.users(2)

    async def run(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meeting.client", "send", "--url", str(api.client.make_url("")).rstrip("/"),
            "--username", alice.username, "--password", "correct horse", "--to", str(bob.id), "--content", "just once 📨", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode()

    first, again, fresh = await asyncio.gather(run("--key", "cli-1"), run("--key", "cli-1"), run())
    assert first[0] == again[0] == fresh[0] == 0
    assert first[1] == again[1] and json.loads(first[1])["content"] == "just once 📨"
    assert json.loads(fresh[1])["id"] != json.loads(first[1])["id"]  # no --key: a new UUID, a new message
    assert len((await api.call("GET", "/messages", user=bob, expect=200))["messages"]) == 2


async def test_send_retries_a_503_with_the_same_key_but_not_a_500(aiohttp_server: Any) -> None:
    """A 500 is a server bug: retrying it only repeats it. A server on a real socket that
    answers 503 and then 500 (our server answers 500 only by mistake, so it cannot be made
    to here) sees exactly two POSTs, both with the same key."""
    keys: list[str] = []
    answers = [(503, "commit_failed"), (500, "internal_error"), (201, "too late")]

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t"})

    async def post(request: web.Request) -> web.Response:
        keys.append(request.headers["Idempotency-Key"])
        status, code = answers[len(keys) - 1]
        return web.json_response({"error": {"code": code, "message": code}}, status=status, headers={"Retry-After": "0"})

    app = web.Application()
    app.router.add_post("/auth/login", login)
    app.router.add_post("/messages", post)
    server = await aiohttp_server(app)
    out = io.StringIO()
    assert await send(str(server.make_url("")).rstrip("/"), "u", "p", [2], "x", attempts=5, out=out) == 1
    assert len(keys) == 2 and keys[0] == keys[1]
    assert json.loads(out.getvalue())["error"]["code"] == "internal_error"


async def test_sent_and_receipts_print_the_senders_view(api: Api) -> None:
    alice, bob, carol = await api.users(3)
    sent = await api.send(alice, [bob, carol], "who read it? 👀")
    await api.call("POST", f"/messages/{sent['id']}/read", user=carol, expect=200)

    async def run(*args: str, user: str = alice.username) -> tuple[int, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meeting.client", *args, "--url", str(api.client.make_url("")).rstrip("/"),
            "--username", user, "--password", "correct horse", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, json.loads(out.decode())

    (code, box), (code2, receipts), (code3, unread), (code4, refused) = await asyncio.gather(
        run("sent"), run("receipts", str(sent["id"])), run("receipts", str(sent["id"]), "--unread"),
        run("receipts", str(sent["id"]), user=bob.username))
    assert (code, code2, code3, code4) == (0, 0, 0, 1)
    assert [(m["id"], m["recipient_ids"], m["read_count"]) for m in box["messages"]] == [(sent["id"], sent["recipient_ids"], 1)]
    assert [(r["user_id"], r["read_at"] is not None) for r in receipts["recipients"]] == sorted([(bob.id, False), (carol.id, True)])
    assert [r["user_id"] for r in unread["recipients"]] == [bob.id] and unread["read_count"] == 1
    assert refused["error"]["code"] == "not_found"  # bob received it; only its sender sees receipts


async def test_sent_receipts_and_send_fail_in_one_line_when_the_server_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for command in (["sent"], ["receipts", "1"], ["send", "--to", "2", "--content", "x"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meeting.client", *command, "--url", f"http://127.0.0.1:{port}", "--username", "u",
            "--password", "p", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1 and out == b""
        assert err.decode().startswith("# request failed: ClientConnectorError") and "Traceback" not in err.decode(), err


async def test_sent_gives_up_on_a_server_that_does_not_answer(aiohttp_server: Any) -> None:
    answered = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await answered.wait()
        return web.json_response({"access_token": "t"})

    app = web.Application()
    app.router.add_post("/auth/login", hang)
    server = await aiohttp_server(app)
    out = io.StringIO()
    try:
        assert await fetch(str(server.make_url("")).rstrip("/"), "u", "p", "/messages", {"box": "sent"}, timeout=0.2, out=out) == 1
    finally:
        answered.set()
    assert out.getvalue() == ""
