"""Meetings: creation with invitations, listing, and who may enter a room.

A meeting and its invitations are written in one transaction through the
MessageService's batch, so nobody is left uninvited by a half-done creation;
with an Idempotency-Key, its stored response too (see meeting.idempotency).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

from sqlalchemy.ext.asyncio import AsyncEngine

from .db import readers
from .errors import DomainError, Invalid, NotFound, Unauthorized
from .idempotency import Keys, Once, Response, key_in_use
from .messages import MEETING_INVITE, Batch, MessageService, NotApplied
from .storage import meetings as store
from .storage import messages as message_store
from .storage import outcomes
from .storage.idempotency import KeyTaken

MAX_PARTICIPANTS = 1000


def invitation_text(title: str, starts_at: dt.datetime | None) -> str:
    when = f" at {starts_at.isoformat()}" if starts_at else ""
    return f"You are invited to the meeting \"{title}\"{when}."


class MeetingService:
    def __init__(self, engine: AsyncEngine, messages: MessageService):
        self._engine = engine
        self._reads = readers(engine)
        self._messages = messages

    async def create(self, organizer_id: int, title: str, participant_ids: Iterable[int],
                     starts_at: dt.datetime | None = None, once: Once | None = None) -> dict[str, Any] | Response:
        """The meeting; with `once` (an Idempotency-Key) its Response, first or replayed."""
        if starts_at is not None:
            starts_at = starts_at.astimezone(dt.timezone.utc)
        invitees = sorted(set(participant_ids) - {organizer_id})
        if len(invitees) >= MAX_PARTICIPANTS:
            raise Invalid("Too many participants.", {"participant_ids": [f"At most {MAX_PARTICIPANTS - 1} besides the organizer."]})
        participants = sorted([organizer_id, *invitees])

        async def write(batch: Batch) -> dict[str, Any] | Response:
            # Lock first, as a send does: the inserts' foreign-key locks must not come first.
            existing = await message_store.lock_users(batch.conn, participants)
            if organizer_id not in existing:  # a token outliving its user
                raise Unauthorized("The user this token was issued to does not exist.", code="unknown_user")
            unknown = sorted(set(invitees) - set(existing))
            # The organizer's row is locked now: a concurrent creation with this key has committed or waits.
            claims = await self._messages.keys.claim(batch.conn, [(organizer_id, once)] if once else [])
            if claims.answers:
                if isinstance(claims.answers[0], DomainError):
                    raise claims.answers[0]
                return claims.answers[0]  # type: ignore[return-value]  # the stored response: nothing written
            if unknown:
                raise Invalid("Some participants do not exist.", {"participant_ids": [f"Unknown user ids: {unknown}"], "unknown_ids": unknown})
            meeting = await store.insert(batch.conn, title, organizer_id, starts_at, participants)
            batch.proof = lambda conn: outcomes.meeting_committed(conn, meeting["id"], organizer_id, meeting["created_at"])
            if invitees:
                await batch.send(organizer_id, invitees, invitation_text(title, starts_at),
                                 type_=MEETING_INVITE, meeting_id=meeting["id"])
            if once is None:
                return meeting
            response = once.render(meeting)
            await Keys.record(batch.conn, [(organizer_id, once, response)], claims)  # the last statements
            return response

        try:
            return await self._messages.in_batch(write)
        except (KeyTaken, NotApplied):  # nothing was stored; with KeyTaken a request with this key won a race
            try:  # and now its row answers
                return await self._messages.in_batch(write)
            except KeyTaken as exc:  # twice: nothing stored, so 409, not 500 (see messages.send_message)
                raise key_in_use() from exc

    async def list_for(self, user_id: int, limit: int, before: int | None) -> dict[str, Any]:
        async with self._reads.connect() as conn:
            rows = await store.of_user(conn, user_id, limit + 1, before)
        page = rows[:limit]
        return {"meetings": page, "next_before": page[-1]["id"] if len(rows) > limit else None}

    async def get(self, user_id: int, meeting_id: int) -> dict[str, Any]:
        """Participants only; anyone else gets the same 404 as for a meeting that does not exist."""
        async with self._reads.connect() as conn:
            meeting = await store.visible(conn, user_id, meeting_id)
        if meeting is None:
            raise NotFound("No such meeting.")
        return meeting

    async def is_participant(self, user_id: int, meeting_id: int) -> bool:
        async with self._reads.connect() as conn:
            return bool(await store.participants_among(conn, meeting_id, [user_id]))
