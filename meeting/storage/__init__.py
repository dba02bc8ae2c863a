"""SQL for each aggregate, owned by meeting.db: the only modules that build queries."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection


async def attach_ids(conn: AsyncConnection, rows: list[dict[str, Any]], parent: sa.Column[Any],
                     child: sa.Column[Any], key: str) -> list[dict[str, Any]]:
    """Give each row (by its "id") the sorted list of `child` ids linked through `parent`, in one query."""
    found: dict[int, list[int]] = defaultdict(list)
    if rows:
        query = sa.select(parent, child).where(parent.in_([r["id"] for r in rows])).order_by(parent, child)
        for parent_id, child_id in await conn.execute(query):
            found[parent_id].append(child_id)
    for row in rows:
        row[key] = found[row["id"]]
    return rows
