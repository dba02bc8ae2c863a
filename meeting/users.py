"""Looking users up: profiles and the recipient finder."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .db import readers
from .errors import NotFound
from .storage import users as user_store


class UserService:
    def __init__(self, engine: AsyncEngine):
        self._engine = engine
        self._reads = readers(engine)

    async def get(self, user_id: int) -> dict[str, Any]:
        async with self._reads.connect() as conn:
            user = await user_store.by_id(conn, user_id)
        if user is None:
            raise NotFound("No such user.")
        return user

    async def search(self, prefix: str, limit: int, after: str | None) -> dict[str, Any]:
        """Keyset pagination on username: `next_after` is the cursor for the next page."""
        async with self._reads.connect() as conn:
            found = await user_store.search(conn, prefix.lower(), limit + 1, after.lower() if after else None)
        page = found[:limit]
        return {"users": page, "next_after": page[-1]["username"] if len(found) > limit else None}
