"""Meetings, invitations, meeting-scoped messages and the meeting-room WebSocket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from meeting.frames import validate_frame
from tests.helpers import Api, Device, User


async def _meeting(api: Api, organizer: User, participants: list[User], title: str = "Weekly 周会") -> Any:
    body = {"title": title, "participant_ids": [p.id for p in participants], "starts_at": "2026-12-01T09:30:00+08:00"}
    return await api.call("POST", "/meetings", user=organizer, json=body, expect=201)


async def test_creating_a_meeting_invites_every_other_participant(api: Api) -> None:
    org, bob, carol, dave = await api.users(4)
    meeting = await _meeting(api, org, [bob, carol, org])
    assert meeting["organizer_id"] == org.id
    assert meeting["participant_ids"] == sorted([org.id, bob.id, carol.id])
    assert meeting["starts_at"] == "2026-12-01T01:30:00+00:00"
    for user in (bob, carol):
        invite = (await api.call("GET", "/messages/unread", user=user))["messages"]
        assert len(invite) == 1
        assert invite[0]["type"] == "meeting.invite" and invite[0]["meeting_id"] == meeting["id"]
        assert invite[0]["sender_id"] == org.id and "Weekly 周会" in invite[0]["content"]
    assert await api.unread_count(org) == 0 and await api.unread_count(dave) == 0


async def test_meeting_visibility_listing_and_validation(api: Api) -> None:
    org, bob, eve = await api.users(3)
    first = await _meeting(api, org, [bob], "one")
    second = await _meeting(api, org, [], "two")
    assert (await api.call("GET", f"/meetings/{first['id']}", user=bob, expect=200))["title"] == "one"
    assert (await api.call("GET", f"/meetings/{first['id']}", user=eve, expect=404))["error"]["code"] == "not_found"
    page = await api.call("GET", "/meetings", user=org, params={"limit": "1"}, expect=200)
    assert [m["id"] for m in page["meetings"]] == [second["id"]] and page["next_before"] == second["id"]
    rest = await api.call("GET", "/meetings", user=org, params={"limit": "1", "before": str(page["next_before"])}, expect=200)
    assert [m["id"] for m in rest["meetings"]] == [first["id"]] and rest["next_before"] is None
    assert [m["id"] for m in (await api.call("GET", "/meetings", user=bob))["meetings"]] == [first["id"]]
    for body, field in (({"participant_ids": []}, "title"), ({"title": "  ", "participant_ids": []}, "title"),
                        ({"title": "x"}, "participant_ids"), ({"title": "x", "participant_ids": [], "starts_at": "2026-12-01T09:30:00"}, "starts_at"),
                        ({"title": "x", "participant_ids": [424242]}, "participant_ids")):
        error = (await api.call("POST", "/meetings", user=org, json=body, expect=422))["error"]
        assert field in error["details"]


async def test_meeting_messages_require_every_party_to_participate(api: Api) -> None:
    org, bob, eve = await api.users(3)
    meeting = await _meeting(api, org, [bob])
    ok = await api.send(org, [bob], "agenda", meeting_id=meeting["id"])
    assert ok["meeting_id"] == meeting["id"]
    assert (await api.send(org, [eve], "psst", expect=403, meeting_id=meeting["id"]))["error"]["code"] == "not_a_participant"
    await api.send(eve, [bob], "let me in", expect=403, meeting_id=meeting["id"])
    await api.send(org, [bob], "nowhere", expect=403, meeting_id=987654)
    assert await api.unread_count(eve) == 0


async def _room(api: Api, meeting_id: int, user: User) -> aiohttp.ClientWebSocketResponse:
    return await api.client.ws_connect(f"/ws/meetings/{meeting_id}", params={"token": user.token})


async def _frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return validate_frame(msg.data)


async def test_room_join_chat_leave(api: Api) -> None:
    org, bob = await api.users(2)
    meeting = await _meeting(api, org, [bob])
    ws_org = await _room(api, meeting["id"], org)
    ws_bob = await _room(api, meeting["id"], bob)
    joined = await _frame(ws_org)
    assert joined["type"] == "meeting.joined" and joined["payload"] == {"user_id": bob.id}
    await ws_bob.send_json({"type": "meeting.chat", "payload": {"text": "大家好 👋"}})
    for ws in (ws_org, ws_bob):
        chat = await _frame(ws)
        assert chat["type"] == "meeting.chat" and chat["payload"] == {"user_id": bob.id, "text": "大家好 👋"}
    await ws_bob.send_str("not json")
    assert (await _frame(ws_bob))["type"] == "error"
    await ws_bob.send_json({"type": "meeting.chat", "payload": {"text": ""}})
    assert (await _frame(ws_bob))["type"] == "error"
    await ws_bob.close()
    left = await _frame(ws_org)
    assert left["type"] == "meeting.left" and left["payload"] == {"user_id": bob.id}
    from meeting.typedefs import rooms_key
    rooms = api.client.app[rooms_key]
    assert len(rooms.rooms[meeting["id"]]) == 1
    await ws_org.close()
    await asyncio.wait_for(_until(lambda: meeting["id"] not in rooms.rooms), 5)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("who", ["stranger", "bad-token", "no-token"])
async def test_room_refuses_before_upgrade(api: Api, who: str) -> None:
    org, eve = await api.users(2)
    meeting = await _meeting(api, org, [])
    params = {"stranger": {"token": eve.token}, "bad-token": {"token": "x.y.z"}, "no-token": {}}[who]
    resp = await api.client.get(f"/ws/meetings/{meeting['id']}", params=params,
                                headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status == (403 if who == "stranger" else 401)
    assert "error" in json.loads(await resp.text())


async def test_binary_frame_closes_room_socket_with_1003(api: Api) -> None:
    org = await api.user()
    meeting = await _meeting(api, org, [])
    ws = await _room(api, meeting["id"], org)
    await ws.send_bytes(b"\x00\x01")
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1003


async def test_concurrent_meetings_and_sends_with_overlapping_users_all_succeed(api: Api) -> None:
    """Meeting creation locks its users like a send does (one global order), so bursts of
    creations and sends among the same people never deadlock; a send that loses a lock race
    anyway is retried whole (nothing was committed)."""
    people = await api.users(6)

    async def create(i: int) -> int:
        org = people[i % 6]
        others = [people[(i + k) % 6] for k in (1, 2, 3)]
        body = {"title": f"m{i}", "participant_ids": [p.id for p in others]}
        resp = await api.client.post("/meetings", json=body, headers=org.headers)
        return resp.status

    async def send(i: int) -> int:
        sender = people[(i + 3) % 6]
        recipients = [people[(i + k) % 6] for k in (4, 5)]
        resp = await api.client.post("/messages", json={"recipient_ids": [r.id for r in recipients], "content": f"s{i}"},
                                     headers=sender.headers)
        return resp.status

    for burst in range(3):
        statuses = await asyncio.gather(*(create(30 * burst + i) for i in range(30)),
                                        *(send(30 * burst + i) for i in range(30)))
        assert statuses == [201] * 60
    # Every invitation and message is stored once, each recipient's seqs gap-free.
    received = 0
    for user in people:
        page = await api.call("GET", "/messages", user=user, params={"after_seq": 0, "limit": 100}, expect=200)
        seqs = [m["seq"] for m in page["messages"]]
        assert seqs == list(range(1, len(seqs) + 1)) and page["next_after_seq"] is None
        received += len(seqs)
    assert received == 90 * 3 + 90 * 2  # 90 meetings x 3 invitees, 90 sends x 2 recipients


async def test_a_meeting_from_a_token_whose_user_is_gone_is_401(api: Api) -> None:
    from meeting.auth import TokenCodec
    from tests.conftest import TEST_SECRET

    ghost = User(10**12, "ghost", TokenCodec(TEST_SECRET, 60).issue(10**12, 1))
    body = await api.call("POST", "/meetings", user=ghost, json={"title": "t", "participant_ids": []}, expect=401)
    assert body["error"]["code"] == "token_revoked"


async def test_room_sockets_have_the_per_user_cap_4029(make_client: Any, config: Any) -> None:
    from meeting.config import with_overrides

    api = Api(await make_client(with_overrides(config, push={"max_connections_per_user": 2})))
    org, bob = await api.users(2)
    meeting = await _meeting(api, org, [bob])
    url = f"/ws/meetings/{meeting['id']}"
    first, second = [Device(await api.client.ws_connect(url, params={"token": org.token})) for _ in range(2)]
    third = Device(await api.client.ws_connect(url, params={"token": org.token}))
    assert await third.closed() == 4029
    bobs = Device(await api.client.ws_connect(url, params={"token": bob.token}))  # another user is not counted
    assert [await first.next() for _ in range(2)] == first.frames
    assert [(f["type"], f["payload"]) for f in first.frames] == [("meeting.joined", {"user_id": org.id}),
                                                                 ("meeting.joined", {"user_id": bob.id})]
    assert await second.expect("meeting.joined") == {"user_id": bob.id}
    await first.ws.close()
    assert await bobs.expect("meeting.left") == {"user_id": org.id}
    fourth = Device(await api.client.ws_connect(url, params={"token": org.token}))  # a place freed up
    assert await bobs.expect("meeting.joined") == {"user_id": org.id}
    assert not fourth.ws.closed


async def test_a_room_socket_warns_before_its_token_expires_then_closes_4001(make_client: Any, config: Any) -> None:
    from meeting.config import with_overrides
    from tests.test_ws import _short_token

    api = Api(await make_client(with_overrides(config, push={"token_expiry_notice": 1.0})))
    org = await api.user()
    meeting = await _meeting(api, org, [])
    room = Device(await api.client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": _short_token(org, 3)}))
    assert "expires_at" in await room.expect("token.expiring")
    assert await room.closed() == 4001
