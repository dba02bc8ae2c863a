"""A thin, typed layer over the test client so tests read like the API docs."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any, Callable

_names = itertools.count(1)


def session_of(user: "User") -> int:
    """The login (auth session) the user's access token belongs to."""
    import jwt

    return int(jwt.decode(user.token, options={"verify_signature": False})["sid"])


@dataclass
class User:
    id: int
    username: str
    token: str
    refresh_token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Api:
    def __init__(self, client: Any):
        self.client = client

    async def call(self, method: str, path: str, user: User | None = None, expect: int | None = None, **kwargs: Any) -> Any:
        headers = {**(user.headers if user else {}), **kwargs.pop("headers", {})}
        resp = await self.client.request(method, path, headers=headers, **kwargs)
        body = await resp.json()
        if expect is not None:
            assert resp.status == expect, (resp.status, body)
        return body

    async def user(self, username: str | None = None, password: str = "correct horse") -> User:
        username = username or f"user{next(_names)}"
        created = await self.call("POST", "/auth/register", json={"username": username, "password": password}, expect=201)
        login = await self.call("POST", "/auth/login", json={"username": username, "password": password}, expect=200)
        return User(created["id"], created["username"], login["access_token"], login["refresh_token"])

    async def users(self, n: int) -> list[User]:
        return [await self.user() for _ in range(n)]

    async def send(self, sender: User, recipients: list[User], content: str = "hello", expect: int = 201, **extra: Any) -> Any:
        body = {"recipient_ids": [r.id for r in recipients], "content": content, **extra}
        return await self.call("POST", "/messages", user=sender, json=body, expect=expect)

    async def unread_count(self, user: User) -> int:
        return int((await self.call("GET", "/messages/unread/count", user=user, expect=200))["count"])


class Held:
    """Wraps an async call of the real app so that, once started, it waits until released:
    a flush or a sync caught in the middle, as under a slow database, without sleeps."""

    def __init__(self, real: Any):
        import asyncio

        self.real = real
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        await self.release.wait()
        return await self.real(*args, **kwargs)


class Device:
    """One client WebSocket on /ws/messages; every frame it reads is schema-validated."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._inbox: Any = None

    def pump(self) -> "Device":
        """Read continuously, as a real client does (aiohttp answers pings only while
        reading), so a short server heartbeat does not drop this device."""
        import asyncio

        self._inbox = asyncio.Queue()

        async def read() -> None:
            while True:
                msg = await self.ws.receive()
                await self._inbox.put(msg)
                if msg.type.name in ("CLOSE", "CLOSED", "CLOSING", "ERROR"):
                    return

        self._pump_task = asyncio.get_running_loop().create_task(read())
        return self

    async def _receive(self) -> Any:
        return await (self._inbox.get() if self._inbox is not None else self.ws.receive())

    @classmethod
    async def connect(cls, api: "Api", user: User, **kwargs: Any) -> "Device":
        params = kwargs.pop("params", {"token": user.token})
        return cls(await api.client.ws_connect("/ws/messages", params=params, **kwargs))

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        import asyncio

        import aiohttp

        from meeting.frames import validate_frame

        msg = await asyncio.wait_for(self._receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, self.ws.close_code)
        frame = validate_frame(msg.data)
        self.frames.append(frame)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.next(timeout)
        assert frame["type"] == type_, frame
        return frame["payload"]

    async def handshake(self) -> dict[str, Any]:
        """`connected`, the backlog frames, `message.synced`: returns the backlog and the marker."""
        await self.expect("connected")
        messages: list[dict[str, Any]] = []
        has_more = False
        while (frame := await self.next())["type"] == "message.unread":
            messages.extend(frame["payload"]["messages"])
            has_more = frame["payload"]["has_more"]
        assert frame["type"] == "message.synced", frame
        return {"messages": messages, "count": frame["payload"]["count"], "has_more": has_more, "synced": frame["payload"]}

    async def resume(self) -> dict[str, Any]:
        """After connecting with `since`: `connected`, the replay (`message.new`), `message.synced`."""
        await self.expect("connected")
        replayed: list[dict[str, Any]] = []
        while (frame := await self.next())["type"] == "message.new":
            replayed.append(frame["payload"])
        assert frame["type"] == "message.synced", frame
        return {"messages": replayed, "synced": frame["payload"]}

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code the server sent."""
        import asyncio

        import aiohttp

        while True:
            msg = await asyncio.wait_for(self._receive(), timeout)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data)  # what the server said, even if our reply could not be sent
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for server-side state to settle: poll a condition, with a deadline (a
    failure after `timeout` seconds, never a sleep that hopes the state has arrived)."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)
