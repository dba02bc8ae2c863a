"""One meeting room across two real `python -m meeting` processes sharing MariaDB and Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from meeting.frames import validate_frame
from tests.test_processes import Instance, _user, instances  # noqa: F401  (fixture)


async def frame(ws: aiohttp.ClientWebSocketResponse) -> tuple[str, dict[str, Any]]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    parsed = validate_frame(msg.data)
    return parsed["type"], parsed["payload"]


async def test_participants_on_two_instances_share_one_room(instances: list[Instance]) -> None:  # noqa: F811
    a, b = instances
    async with aiohttp.ClientSession(a.url) as http_a, aiohttp.ClientSession(b.url) as http_b:
        org, bob, carol = await _user(http_a, "org"), await _user(http_a, "bob"), await _user(http_b, "carol")
        async with http_a.post("/meetings", json={"title": "Across", "participant_ids": [bob["id"], carol["id"]],
                                                  "starts_at": "2030-01-01T10:00:00+00:00"},
                               headers={"Authorization": f"Bearer {org['token']}"}) as r:
            assert r.status == 201, await r.text()
            meeting = await r.json()
        path = f"/ws/meetings/{meeting['id']}"
        ws_org = await http_a.ws_connect(path, params={"token": org["token"]})
        ws_bob = await http_b.ws_connect(path, params={"token": bob["token"]})
        # bob joined on B; org, on A, hears of it through Redis
        assert await frame(ws_org) == ("meeting.joined", {"user_id": bob["id"]})
        ws_carol = await http_a.ws_connect(path, params={"token": carol["token"]})
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
