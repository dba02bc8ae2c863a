"""One meeting room across two real `python -m meeting` processes sharing MariaDB and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from meeting.frames import validate_frame
from tests.conftest import _clean_mariadb
from tests.test_processes import Instance, _start, _user, instance_env


@pytest.fixture
async def cluster(tmp_path: Path, mariadb_url: str, redis_url: str) -> AsyncIterator[tuple[list[Instance], str]]:
    """Two instances and their Redis prefix."""
    _clean_mariadb(mariadb_url)
    # The default heartbeat: these sockets are read only when a frame is expected, and aiohttp
    # answers pings only while reading (instance_env's 0.5 s would drop a socket left unread).
    env = instance_env(mariadb_url, redis_url) | {"MEETING_PUSH_HEARTBEAT": "30"}
    started = list(await asyncio.gather(_start(tmp_path, env), _start(tmp_path, env)))
    yield started, env["MEETING_REDIS_PREFIX"]
    for instance in started:
        if instance.proc.returncode is None:
            instance.proc.terminate()
            await asyncio.wait_for(instance.proc.wait(), 15)


class Wire:
    """A subscriber of our own on a room channel: shows when an instance has published a
    frame, so the next participant connects after it (a join is announced once the
    joining instance follows the room, which the client cannot see)."""

    def __init__(self, pubsub: Any):
        self.pubsub = pubsub

    async def published(self, type_: str, user_id: int) -> None:
        async def wait() -> None:
            while True:
                message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    parsed = validate_frame(message["data"].decode().split(" ", 3)[3])
                    if (parsed["type"], parsed["payload"].get("user_id")) == (type_, user_id):
                        return
        await asyncio.wait_for(wait(), 10)


async def frame(ws: aiohttp.ClientWebSocketResponse) -> tuple[str, dict[str, Any]]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    parsed = validate_frame(msg.data)
    return parsed["type"], parsed["payload"]


async def test_participants_on_two_instances_share_one_room(cluster: tuple[list[Instance], str], redis_url: str) -> None:
    (a, b), prefix = cluster
    probe = aioredis.Redis.from_url(redis_url)
    pubsub = probe.pubsub()
    try:
        await _scenario(a, b, prefix, pubsub)
    finally:
        await pubsub.aclose()
        await probe.aclose()


async def _scenario(a: Instance, b: Instance, prefix: str, pubsub: Any) -> None:
    async with aiohttp.ClientSession(a.url) as http_a, aiohttp.ClientSession(b.url) as http_b:
        org, bob, carol = await _user(http_a, "org"), await _user(http_a, "bob"), await _user(http_b, "carol")
        async with http_a.post("/meetings", json={"title": "Across", "participant_ids": [bob["id"], carol["id"]],
                                                  "starts_at": "2030-01-01T10:00:00+00:00"},
                               headers={"Authorization": f"Bearer {org['token']}"}) as r:
            assert r.status == 201, await r.text()
            meeting = await r.json()
        path = f"/ws/meetings/{meeting['id']}"
        await pubsub.subscribe(f"{prefix}:room:{meeting['id']}")
        wire = Wire(pubsub)
        ws_org = await http_a.ws_connect(path, params={"token": org["token"]})
        await wire.published("meeting.joined", org["id"])
        ws_bob = await http_b.ws_connect(path, params={"token": bob["token"]})
        await wire.published("meeting.joined", bob["id"])
        # bob joined on B; org, on A, hears of it through Redis
        assert await frame(ws_org) == ("meeting.joined", {"user_id": bob["id"]})
        ws_carol = await http_a.ws_connect(path, params={"token": carol["token"]})
        await wire.published("meeting.joined", carol["id"])
        for ws in (ws_org, ws_bob):
            assert await frame(ws) == ("meeting.joined", {"user_id": carol["id"]})

        await ws_bob.send_json({"type": "meeting.chat", "payload": {"text": "from B"}})
        await ws_org.send_json({"type": "meeting.chat", "payload": {"text": "from A"}})
        org_chat = {"user_id": org["id"], "text": "from A"}
        bob_chat = {"user_id": bob["id"], "text": "from B"}
        # each member gets each chat once; frames from one origin keep their order
        for ws in (ws_org, ws_bob, ws_carol):
            got = [await frame(ws), await frame(ws)]
            assert sorted(got, key=lambda f: f[1]["text"]) == [("meeting.chat", org_chat), ("meeting.chat", bob_chat)]

        await ws_bob.close()
        for ws in (ws_org, ws_carol):
            assert await frame(ws) == ("meeting.left", {"user_id": bob["id"]})
        await ws_carol.send_json({"type": "meeting.chat", "payload": {"text": "still here"}})
        assert await frame(ws_org) == ("meeting.chat", {"user_id": carol["id"], "text": "still here"})
        assert await frame(ws_carol) == ("meeting.chat", {"user_id": carol["id"], "text": "still here"})
        # nothing else was queued for org: no echo of A's own frames came back through Redis
        await ws_carol.send_json({"type": "meeting.chat", "payload": {"text": "last"}})
        assert await frame(ws_org) == ("meeting.chat", {"user_id": carol["id"], "text": "last"})
        for ws in (ws_org, ws_carol):
            await ws.close()
