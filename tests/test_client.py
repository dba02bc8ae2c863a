"""`python -m meeting.client listen` against a live test server, as a person would run it."""

from __future__ import annotations

import asyncio
import json
import sys

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
