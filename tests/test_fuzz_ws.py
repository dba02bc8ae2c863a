"""Fuzzing both WebSockets with Hypothesis: random JSON, wrong types for every known frame
type, raw text, frames over push.max_frame_size, binary frames and floods.

Alice's sockets get the fuzz; Bob and Carol are bystanders. While each program of frames
runs, Carol sends messages (REST) and chat lines (room) to both. The properties:
- no frame closes a socket with 1011, nor logs an error or a traceback on the server;
  the only closes are 1009 for an oversize frame and 1003 for a binary one;
- every frame the server sends validates against its schema;
- Bob's sockets see exactly what was sent to them, in order (message.new seq by seq on
  /ws/messages; Carol's chat lines in order in the room), and nothing of Alice's errors;
- delivery to Alice continues: across her reconnects (`since`) she sees every message
  exactly once in seq order, and after each program the room still reaches her.

The programs are drawn first (derandomized, no example database), then played against a
live server: Hypothesis cannot drive an event loop that is already running.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from meeting.config import Config
from meeting.connection import CLOSE_TOO_BIG, CLOSE_UNSUPPORTED
from meeting.frames import validate_frame
from tests.conftest import base_config
from tests.helpers import Api, User

#: push.max_frame_size here: above any text frame drawn (at most 2,100 characters escaped to
#: 12 bytes each, or 2 x MAX_FRAME // 4 brackets), below every oversize one.
MAX_FRAME = 32768
PROGRAMS = 60
TIMEOUT = 10.0

# --- strategies -------------------------------------------------------------------------

#: Text with lone surrogates mixed in: valid JSON ("\ud800" escaped), but not valid Unicode.
#: (Built from a list: st.text() never yields a surrogate, whatever its alphabet.)
_texts = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff", "\u202e", "\x00"]), max_size=20).map("".join)
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | _texts
            | st.sampled_from([0, -1, 2**63, 2**64, "", " ", "ping", "read", "refresh", "meeting.chat"]))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
                           max_leaves=12)
_no_surrogates = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)  # raw text, mostly not JSON
_nested = st.integers(1, MAX_FRAME // 4).map(lambda depth: "[" * depth + "]" * depth)  # past 32 deep: json_too_deep


def _frame(type_: Any, payload: Any) -> dict[str, Any]:
    return {"type": type_, "payload": payload}


#: /ws/messages: known types with payloads of every shape, payload fields of the wrong type.
push_frames = st.one_of(
    json_values,
    st.builds(_frame, st.sampled_from(["ping", "read", "refresh"]) | json_values, json_values),
    st.builds(lambda ids: _frame("read", {"ids": ids}), json_values | st.lists(st.integers(-2, 2**64), max_size=5)),
    st.builds(lambda token: _frame("refresh", {"token": token}), json_values),
    st.builds(lambda extra: {"type": "ping", **extra}, st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
)
#: /ws/meetings/{id}: meeting.chat with payloads and texts of every shape.
room_frames = st.one_of(
    json_values,
    st.builds(_frame, st.just("meeting.chat") | json_values, json_values),
    st.builds(lambda text: _frame("meeting.chat", {"text": text}), json_values | st.text(max_size=2100)),
    st.builds(lambda text: _frame("meeting.chat", {"text": text}), _texts),
    st.builds(lambda text: _frame("meeting.chat", {"text": text}), _texts),
)


@dataclass(frozen=True)
class Action:
    target: str            # "push" (Alice's /ws/messages) or "room" (Alice's room socket)
    kind: str              # "text", "oversize", "binary"
    data: str | bytes = ""
    repeat: int = 1        # > 1: a flood of the same frame, sent without waiting


def _action(target: str, kind: str) -> st.SearchStrategy[Action]:
    if kind == "oversize":
        return st.builds(lambda n, c: Action(target, kind, json.dumps({"type": "ping", "payload": {"pad": c * n}})),
                         st.integers(MAX_FRAME + 1, 2 * MAX_FRAME), st.sampled_from("x界"))
    if kind == "binary":
        return st.builds(lambda b: Action(target, kind, b), st.binary(max_size=64))
    frames = push_frames if target == "push" else room_frames
    encoded = frames.map(lambda value: json.dumps(value, ensure_ascii=True))  # "\ud800" stays an escape on the wire
    repeat = st.integers(20, 60) if kind == "flood" else st.just(1)
    return st.builds(Action, st.just(target), st.just("text"), encoded | _no_surrogates | _nested, repeat)


#: Mostly single text frames; floods, oversize and binary frames (each closes, then a reconnect) now and then.
actions = st.tuples(st.sampled_from(["push", "room"]), st.sampled_from(["text"] * 6 + ["flood", "oversize", "binary"])).flatmap(
    lambda choice: _action(*choice))
programs = st.lists(actions, min_size=1, max_size=8)


def draw_programs() -> list[list[Action]]:
    drawn: list[list[Action]] = []

    @settings(max_examples=PROGRAMS, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(program=programs)
    def collect(program: list[Action]) -> None:
        drawn.append(program)

    collect()
    return drawn


# --- sockets ----------------------------------------------------------------------------

class Closed(Exception):
    def __init__(self, code: int | None):
        super().__init__(f"closed with {code}")
        self.code = code


class Socket:
    """A client WebSocket read continuously (as a real client does); every text frame is
    schema-validated and kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._inbox: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            msg = await self.ws.receive()
            await self._inbox.put(msg)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return

    async def next(self) -> dict[str, Any]:
        msg = await asyncio.wait_for(self._inbox.get(), TIMEOUT)
        if msg.type == aiohttp.WSMsgType.TEXT:
            frame = validate_frame(msg.data)
            self.frames.append(frame)
            return frame
        raise Closed(int(msg.data) if msg.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code)

    async def send(self, action: Action) -> None:
        for _ in range(action.repeat):
            if isinstance(action.data, bytes):
                await self.ws.send_bytes(action.data)
            else:
                await self.ws.send_str(action.data)

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Inbox:
    """Alice's /ws/messages across reconnects: every message.new exactly once, in seq order."""

    ALLOWED = {"pong", "error", "token.refreshed", "message.read", "message.new"}

    def __init__(self, api: Api, user: User):
        self.api, self.user = api, user
        self.seq = 0
        self.socket: Socket | None = None

    async def connect(self) -> None:
        params = {"token": self.user.token} | ({"since": str(self.seq)} if self.socket else {})
        self.socket = Socket(await self.api.client.ws_connect("/ws/messages", params=params))
        assert (await self.socket.next())["type"] == "connected"
        while (frame := await self.socket.next())["type"] in ("message.new", "message.unread"):
            for message in [frame["payload"]] if frame["type"] == "message.new" else frame["payload"]["messages"]:
                self._saw(message)
        assert frame["type"] == "message.synced" and frame["payload"]["seq"] == self.seq, frame

    def _saw(self, message: dict[str, Any]) -> None:
        assert message["seq"] == self.seq + 1, (message["seq"], self.seq)
        self.seq = message["seq"]

    async def read(self) -> None:
        """One frame; a close propagates as Closed."""
        assert self.socket is not None
        frame = await self.socket.next()
        assert frame["type"] in self.ALLOWED, frame
        if frame["type"] == "message.new":
            self._saw(frame["payload"])

    async def until_closed(self) -> int | None:
        try:
            while True:
                await self.read()
        except Closed as closed:
            return closed.code

    async def until_seq(self, seq: int) -> None:
        while self.seq < seq:
            await self.read()


@pytest.fixture
def fuzz_config(tmp_path: Any) -> Config:
    return base_config(database={"url": f"sqlite+aiosqlite:///{tmp_path / 'fuzz.db'}"}, push={"max_frame_size": MAX_FRAME})


async def test_no_websocket_frame_breaks_a_socket_or_anyone_elses(make_client: Any, fuzz_config: Config,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    plan = draw_programs()
    api = Api(await make_client(fuzz_config))
    alice, bob, carol = await api.users(3)
    meeting = await api.call("POST", "/meetings", user=carol, json={"title": "fuzz", "participant_ids": [alice.id, bob.id]}, expect=201)
    room_url = f"/ws/meetings/{meeting['id']}"

    async def join(user: User) -> Socket:
        return Socket(await api.client.ws_connect(room_url, params={"token": user.token}))

    bob_push = Socket(await api.client.ws_connect("/ws/messages", params={"token": bob.token}))
    assert [(await bob_push.next())["type"] for _ in range(3)] == ["connected", "message.unread", "message.synced"]
    bob_base = bob_push.frames[2]["payload"]["seq"]  # the meeting's invitation
    bob_room, carol_room = await join(bob), await join(carol)
    inbox = Inbox(api, alice)
    await inbox.connect()
    alice_base = inbox.seq
    alice_room = await join(alice)

    sent: list[str] = []   # Carol's messages, in the order the server accepted them
    chats: list[str] = []  # Carol's chat lines, in order
    closes: list[tuple[str, int | None]] = []

    async def carol_meanwhile(round_: int) -> None:
        for i in range(2):
            body = await api.call("POST", "/messages", user=carol, expect=201,
                                  json={"recipient_ids": [alice.id, bob.id], "content": f"round {round_} message {i}"})
            sent.append(body["content"])
            chats.append(f"round {round_} chat {i}")
            await carol_room.ws.send_json({"type": "meeting.chat", "payload": {"text": chats[-1]}})

    async def play(program: list[Action]) -> None:
        nonlocal alice_room
        for action in program:
            if action.target == "push":
                assert inbox.socket is not None
                await inbox.socket.send(action)
                if action.kind != "text":
                    code = await inbox.until_closed()
                    closes.append(("push", code))
                    assert code == (CLOSE_TOO_BIG if action.kind == "oversize" else CLOSE_UNSUPPORTED), (action, code)
                    await inbox.connect()  # resumes with since: nothing lost, nothing twice
            else:
                await alice_room.send(action)
                if action.kind != "text":
                    try:
                        while True:
                            await alice_room.next()
                    except Closed as closed:
                        closes.append(("room", closed.code))
                        assert closed.code == (CLOSE_TOO_BIG if action.kind == "oversize" else CLOSE_UNSUPPORTED), (action, closed.code)
                    alice_room = await join(alice)

    for round_, program in enumerate(plan):
        await asyncio.gather(play(program), carol_meanwhile(round_))
        # Bob: exactly Carol's messages, one seq after another, and nothing else
        while len(bob_push.frames) < 3 + len(sent):
            await bob_push.next()
        news = bob_push.frames[3:]
        assert [(f["type"], f["payload"]["seq"], f["payload"]["content"]) for f in news] == \
               [("message.new", seq, content) for seq, content in enumerate(sent, bob_base + 1)]
        # Bob's room: Carol's lines in order; of Alice only chat lines, joins and leaves
        while sum(f["payload"]["user_id"] == carol.id for f in bob_room.frames if f["type"] == "meeting.chat") < len(chats):
            await bob_room.next()
        carols = [f for f in bob_room.frames if f["payload"]["user_id"] == carol.id]
        assert [(f["type"], f["payload"].get("text")) for f in carols] == [("meeting.joined", None)] + [("meeting.chat", t) for t in chats]
        assert {f["type"] for f in bob_room.frames if f not in carols} <= {"meeting.chat", "meeting.joined", "meeting.left"}
        assert {f["payload"]["user_id"] for f in bob_room.frames if f not in carols} == {alice.id}
        # Alice: still reached on both sockets
        await inbox.until_seq(alice_base + len(sent))
        await carol_room.ws.send_json({"type": "meeting.chat", "payload": {"text": f"after round {round_}"}})
        chats.append(f"after round {round_}")
        while not any(f["type"] == "meeting.chat" and f["payload"] == {"user_id": carol.id, "text": chats[-1]} for f in alice_room.frames):
            await alice_room.next()

    assert bob_push.ws.close_code is None and bob_room.ws.close_code is None and carol_room.ws.close_code is None
    assert {kind for _, kind in closes} <= {CLOSE_TOO_BIG, CLOSE_UNSUPPORTED}
    assert len(closes) >= 10, "the plan closes sockets often enough to test reconnects"  # derandomized: a fixed plan
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    for socket in (bob_push, bob_room, carol_room, alice_room, inbox.socket):
        assert socket is not None
        await socket.close()
