"""A thin, typed layer over the test client so tests read like the API docs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

_names = itertools.count(1)


@dataclass
class User:
    id: int
    username: str
    token: str

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
        return User(created["id"], created["username"], login["access_token"])

    async def users(self, n: int) -> list[User]:
        return [await self.user() for _ in range(n)]

    async def send(self, sender: User, recipients: list[User], content: str = "hello", expect: int = 201, **extra: Any) -> Any:
        body = {"recipient_ids": [r.id for r in recipients], "content": content, **extra}
        return await self.call("POST", "/messages", user=sender, json=body, expect=expect)

    async def unread_count(self, user: User) -> int:
        return int((await self.call("GET", "/messages/unread/count", user=user, expect=200))["count"])
