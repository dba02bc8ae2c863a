"""Strict input: what a client sends is refused with a JSON 4xx unless it is exactly what the
contract says (issue 11). Each case here was a 500, or was quietly accepted, before."""

from __future__ import annotations

import pytest

from meeting.handlers.common import MAX_JSON_DEPTH
from tests.helpers import Api, Device

JSON = {"Content-Type": "application/json"}


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login", "/messages"])
async def test_deeply_nested_json_is_400_not_a_recursion_error(api: Api, path: str) -> None:
    user = await api.user()
    for depth in (MAX_JSON_DEPTH + 1, 10_000, 100_000):
        body = await api.call("POST", path, user=user, data=_nested(depth), headers=JSON, expect=400)
        assert body["error"]["code"] == "json_too_deep"
    # within the limit it is only the wrong shape: the schema's 422
    shallow = await api.call("POST", path, user=user, data=_nested(MAX_JSON_DEPTH), headers=JSON, expect=422)
    assert shallow["error"]["code"] == "validation_error"


async def test_lone_surrogates_are_422_and_never_stored(api: Api) -> None:
    alice, bob = await api.users(2)
    send = '{"recipient_ids": [%d], "content": "hi \\ud800 there"}' % bob.id
    body = await api.call("POST", "/messages", user=alice, data=send, headers=JSON, expect=422)
    assert body["error"]["code"] == "invalid_text" and body["error"]["details"] == {"content": ["Not valid Unicode text."]}
    register = '{"username": "mallory", "password": "correct horse", "display_name": "\\udfff"}'
    assert (await api.call("POST", "/auth/register", data=register, headers=JSON, expect=422))["error"]["code"] == "invalid_text"
    key = '{"recipient_ids": [%d], "content": "x", "\\ud83d": 1}' % bob.id
    assert (await api.call("POST", "/messages", user=alice, data=key, headers=JSON, expect=422))["error"]["code"] == "invalid_text"
    assert await api.unread_count(bob) == 0
    # a valid pair (an emoji written as escapes) is fine
    await api.call("POST", "/messages", user=alice, data=send.replace("\\ud800", "\\ud83d\\ude00"), headers=JSON, expect=201)
    assert (await api.call("GET", "/messages/unread", user=bob))["messages"][0]["content"] == "hi 😀 there"


@pytest.mark.parametrize("path", ["/users/" + "9" * 5000, "/users/" + "1" * 20, "/users/١٢", "/messages/٣", "/meetings/１",
                                  "/users/12x", "/messages/1%0A/read"])
async def test_path_ids_are_1_to_19_ascii_digits_else_404(api: Api, path: str) -> None:
    user = await api.user()
    method = "POST" if path.endswith("/read") else "GET"
    assert (await api.call(method, path, user=user, expect=404))["error"]["code"] == "not_found"


@pytest.mark.parametrize("value", ["5_0", "+5", " 5", "٥", "5.0", "0x10", "1" * 20])
async def test_query_integers_are_ascii_digits_only(api: Api, value: str) -> None:
    user = await api.user()
    for path, params in (("/messages", {"limit": value}), ("/messages", {"before": value}), ("/messages", {"after_seq": value}),
                         ("/messages/unread", {"after_seq": value})):
        body = await api.call("GET", path, user=user, params=params, expect=422)
        assert body["error"]["code"] == "validation_error" and set(body["error"]["details"]) == set(params)


@pytest.mark.parametrize("starts_at", ["0001-01-01T00:00:00+08:00", "9999-12-31T23:00:00-05:00", "1969-12-31T23:59:59+00:00"])
async def test_out_of_range_meeting_times_are_422(api: Api, starts_at: str) -> None:
    org = await api.user()
    body = await api.call("POST", "/meetings", user=org, json={"title": "t", "participant_ids": [], "starts_at": starts_at}, expect=422)
    assert list(body["error"]["details"]) == ["starts_at"]


@pytest.mark.parametrize("value", ["yes", 1, "true", 0, None, "on"])
async def test_booleans_are_only_true_or_false(api: Api, value: object) -> None:
    alice, bob = await api.users(2)
    await api.send(alice, [bob])
    body = await api.call("POST", "/messages/read", user=bob, json={"all": value}, expect=422)
    assert "all" in body["error"]["details"]
    assert await api.unread_count(bob) == 1


@pytest.mark.parametrize("username", ["alice\n", "alice\r\n", "bob\x00", " carol"])
async def test_usernames_are_matched_in_full(api: Api, username: str) -> None:
    body = await api.call("POST", "/auth/register", json={"username": username, "password": "correct horse"}, expect=422)
    assert list(body["error"]["details"]) == ["username"]


@pytest.mark.parametrize("name", ["evil\u202egnp.exe", "a\u2066b", "bell\x07", "line\nbreak", "del\x7f", "sep\u2028"])
async def test_display_names_refuse_control_and_bidi_characters(api: Api, name: str) -> None:
    body = await api.call("POST", "/auth/register", json={"username": "dana", "password": "correct horse", "display_name": name}, expect=422)
    assert list(body["error"]["details"]) == ["display_name"]


async def test_display_names_keep_ordinary_unicode(api: Api) -> None:
    created = await api.call("POST", "/auth/register", json={"username": "erin", "password": "correct horse",
                                                               "display_name": "Érin 爱丽丝 👩\u200d💻 עברית"}, expect=201)
    assert created["display_name"] == "Érin 爱丽丝 👩\u200d💻 עברית"


async def test_websocket_frames_get_the_same_checks_and_the_socket_lives_on(api: Api) -> None:
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    for raw, code in ((_nested(10_000), "json_too_deep"), ('{"type": "ping", "payload": {"x": "\\ud800"}}', "invalid_text"),
                      ("nope", "invalid_json")):
        await device.ws.send_str(raw)
        assert (await device.expect("error"))["code"] == code
    await device.ws.send_json({"type": "ping"})
    assert await device.expect("pong") == {}


async def test_a_bad_room_frame_answers_its_sender_and_closes_nobody(api: Api) -> None:
    org, bob = await api.users(2)
    meeting = await api.call("POST", "/meetings", user=org, json={"title": "t", "participant_ids": [bob.id]}, expect=201)
    rooms = [Device(await api.client.ws_connect(f"/ws/meetings/{meeting['id']}", params={"token": u.token})) for u in (org, bob)]
    assert await rooms[0].expect("meeting.joined") == {"user_id": bob.id}
    await rooms[1].ws.send_str('{"type": "meeting.chat", "payload": {"text": "\\ud800"}}')
    assert (await rooms[1].expect("error"))["code"] == "invalid_text"
    await rooms[1].ws.send_json({"type": "meeting.chat", "payload": {"text": "still here"}})
    for room in rooms:
        assert await room.expect("meeting.chat") == {"user_id": bob.id, "text": "still here"}


async def test_patterns_mean_what_the_openapi_document_says(api: Api) -> None:
    """A JSON Schema pattern is ECMA-262 and searched anywhere in the string: the server
    checks it the same way, so a title that starts with a space is not blank, and a
    client (or a fuzzer) that trusts the document is never refused valid input."""
    spec = await api.call("GET", "/openapi.json", expect=200)
    patterns = {name: schema["properties"][field]["pattern"] for name, field in
                (("CreateMeeting", "title"), ("Register", "username"))
                for schema in [spec["components"]["schemas"][name]]}
    assert patterns == {"CreateMeeting": r"\S", "Register": "^[A-Za-z0-9_.-]{3,32}$"}
    org = await api.user()
    meeting = await api.call("POST", "/meetings", user=org, json={"title": "  standup", "participant_ids": []}, expect=201)
    assert meeting["title"] == "  standup"
    error = (await api.call("POST", "/meetings", user=org, json={"title": " \t ", "participant_ids": []}, expect=422))["error"]
    assert list(error["details"]) == ["title"]
