"""MessageService: the one place messages are written and read.

It knows nothing of HTTP or websockets. Whoever needs to react to a stored or
read message (real-time push) registers a listener; listeners run only after
the transaction committed, so nobody is ever told about a message that a
rollback then erased.

A write whose COMMIT fails (connection lost while committing) may or may not
have been applied. It is never retried blindly: the service looks, with a
locking read, for a row only that transaction inserted. Applied: the answers
stand. Not applied: it fails like any error before the commit (the group
commit then retries each send alone, and a lone send runs once more: safe).
Unknown (the database cannot be asked): each send that would have stored
something fails with 503 `commit_unknown`, which an Idempotency-Key makes safe
to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .cache import INBOX, UNREAD, MessageCache
from .combine import Combiner, OutcomeUnknown
from .db import CommitFailed, readers, transaction
from .errors import DomainError, Forbidden, Invalid, NotFound, Unauthorized, Unavailable
from .idempotency import Claims, Keys, Once, Response, key_in_use
from .reads import ReadListener, Reads, ReceiptListener, page as _page
from .recipients import RecipientLists
from .storage import meetings as meeting_store
from .storage import messages as store
from .storage import outcomes
from .storage.idempotency import KeyTaken
from .storage.packets import Packets
from .writer import WriterConnection

log = logging.getLogger(__name__)

TEXT = "text"
MEETING_INVITE = "meeting.invite"
MAX_RECIPIENTS = 1000
MAX_CONTENT = 10_000
PAGE_SIZE = 50

Message = dict[str, Any]
SyncPoint = tuple[int, int, list[Message]]  # last seq, unread count up to it, the first unread rows
T = TypeVar("T")
StoredListener = Callable[[Message], Awaitable[None]]
#: Whether a transaction whose COMMIT failed was applied (None: cannot tell).
Proof = Callable[[AsyncConnection], Awaitable[bool]]


class CommitUnknown(DomainError, OutcomeUnknown):
    """The COMMIT failed and nobody can tell whether it was applied: never retried here."""

    status, code, retry_after = 503, "commit_unknown", 1


def commit_unknown() -> CommitUnknown:
    return CommitUnknown("The database connection was lost while committing: this request may or may not have been "
                         "stored. Retry it with an Idempotency-Key header (send one on every POST to make retries safe).")


class NotApplied(Unavailable):
    """A COMMIT failed and the transaction was not applied: retrying is safe."""

    code = "commit_failed"


@dataclass(frozen=True)
class Send:
    """One send waiting for the group commit: the draft and its Idempotency-Key, if any."""
    draft: store.Draft
    once: Once | None = None


def _stores(result: Any) -> bool:
    """Whether this answer stored a message (not a refusal, not a replay)."""
    return isinstance(result, dict) or (isinstance(result, Response) and result.fresh is not None)


def _needs_commit(result: Any) -> bool:
    """Whether this answer is true only if its transaction committed (a stored message,
    or the same-batch duplicate of a keyed one)."""
    return isinstance(result, dict) or (isinstance(result, Response) and result.new)


def fresh(results: Iterable[Any]) -> list[Message]:
    """The messages a transaction stored, in order (a keyed send carries its own)."""
    return [r if isinstance(r, dict) else r.fresh for r in results if _stores(r)]



def _write_op(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Counts a write from its call until its listeners returned, so that shutdown can
    wait for everything committed to have been handed to push (see `settle`)."""

    @functools.wraps(method)
    async def tracked(self: "MessageService", *args: Any, **kwargs: Any) -> T:
        async with self.writing():
            return await method(self, *args, **kwargs)

    return tracked


def _encode_rows(rows: list[Message]) -> str:
    return json.dumps(rows, default=lambda v: v.isoformat(), ensure_ascii=False)


def _decode_rows(raw: str) -> list[Message]:
    rows = json.loads(raw)
    for row in rows:
        for key in ("created_at", "read_at"):
            if row.get(key) is not None:
                row[key] = dt.datetime.fromisoformat(row[key])
    return rows


def draft(sender_id: int, recipient_ids: Iterable[int], content: str, *, type_: str = TEXT,
          meeting_id: int | None = None) -> store.Draft:
    """Checks that need no database, before a send takes a place in a transaction."""
    recipients = tuple(sorted(set(recipient_ids)))
    errors: dict[str, list[str]] = {}
    if not recipients or len(recipients) > MAX_RECIPIENTS:
        errors["recipient_ids"] = [f"Between 1 and {MAX_RECIPIENTS} distinct user ids."]
    if not content.strip() or len(content) > MAX_CONTENT:
        errors["content"] = [f"1 to {MAX_CONTENT} characters, not only white space."]
    if errors:
        raise Invalid("The message is not valid.", errors)
    return store.Draft(sender_id, recipients, content, type_, meeting_id)


async def store_drafts(conn: AsyncConnection, drafts: list[store.Draft], keys: Keys | None = None,
                       onces: list[Once | None] | None = None, look: bool = True,
                       packets: Packets | None = None) -> list[Message | DomainError | Response]:
    """Store what may be stored; answer a domain error for each draft that may not.

    With `onces` (an Idempotency-Key per draft, or None): a keyed draft whose key
    was used answers the stored response (or KeyReused) and stores nothing; a keyed
    draft stored answers its rendered Response, recorded in this transaction. Without
    `look`, the keys are not looked up first: one that was used raises KeyTaken. With
    `packets` (`packable`), its statements go as packets (meeting.storage.packets)."""
    asks = [None if o is None else (d.sender_id, o) for d, o in zip(drafts, onces or ())]
    claims = await keys.claim(conn, asks, look) if keys is not None and any(asks) else Claims()
    claimed = claims.answers
    refused: dict[int, DomainError] = {}
    for i, d in enumerate(drafts):
        if i in claimed:
            continue
        if d.meeting_id is not None:
            members = await meeting_store.participants_among(conn, d.meeting_id, [d.sender_id, *d.recipient_ids])
            if members != {d.sender_id, *d.recipient_ids}:
                refused[i] = Forbidden("The sender and every recipient must take part in that meeting.", code="not_a_participant")
    allowed = [d for i, d in enumerate(drafts) if i not in refused and i not in claimed]
    answers = iter(await store.insert_many(conn, allowed, packets) if allowed else [])
    results: list[Any] = []
    done: list[tuple[int, Once, Response]] = []
    for i in range(len(drafts)):
        if i in claimed:
            results.append(None)  # answered below, once the batch's own outcomes are known
            continue
        answer = refused.get(i) or next(answers)
        if isinstance(answer, list):  # unknown users: that draft took no seq
            answer = _unknown(drafts[i].sender_id, sorted(answer))
        ask = asks[i] if asks else None
        if ask is not None and isinstance(answer, dict):
            rendered = ask[1].render(answer)
            answer = Response(rendered.status, rendered.body, fresh=answer, new=True)
            done.append((ask[0], ask[1], answer))
        results.append(answer)
    for i, claim in claimed.items():
        results[i] = Keys.duplicate(asks, i, claim, results[claim]) if isinstance(claim, int) else claim
    if done:
        await Keys.record(conn, done, claims, packets)
    return results


def packable(drafts: list[store.Draft], look: bool) -> bool:
    """Whether `store_drafts` can run as packets: every statement it would run has a packed
    form (a key lookup and a meeting's participants check have not: both are rare)."""
    return not look and all(d.meeting_id is None for d in drafts)


def _unknown(sender_id: int, unknown: list[int]) -> DomainError:
    if sender_id in unknown:  # a token outliving its user (database reset, another deployment's secret)
        return Unauthorized("The user this token was issued to does not exist.", code="unknown_user")
    return Invalid("Some recipients do not exist.", {"recipient_ids": [f"Unknown user ids: {unknown}"], "unknown_ids": unknown})


class Batch:
    """Messages sent inside one transaction (e.g. a meeting and its invitations)."""

    def __init__(self, conn: AsyncConnection):
        self.conn = conn
        self.stored: list[Message] = []
        #: How to tell, if the COMMIT fails, whether this batch was applied: set with its first row.
        self.proof: Proof | None = None

    async def send(self, sender_id: int, recipient_ids: Iterable[int], content: str, *,
                   type_: str = TEXT, meeting_id: int | None = None) -> Message:
        [result] = await store_drafts(self.conn, [draft(sender_id, recipient_ids, content, type_=type_, meeting_id=meeting_id)])
        if isinstance(result, DomainError):
            raise result  # rolls the whole batch back
        self.stored.append(result)
        self.proof = self.proof or _message_proof(result)
        return result


def _message_proof(message: Message) -> Proof:
    return lambda conn: outcomes.message_committed(conn, message["id"], message["sender_id"], message["created_at"])


class MessageService:
    def __init__(self, engine: AsyncEngine, cache: MessageCache, max_batch: int = 64, transaction_attempts: int = 4,
                 keys: Keys | None = None, sync_point_batch: int = 25, sync_point_lanes: int = 4):
        self._engine = engine
        self._attempts = transaction_attempts
        self._reads = readers(engine)
        self._cache = cache
        self.keys = keys or Keys(ttl=86400)
        self.on_stored: list[StoredListener] = []
        self.on_read: list[ReadListener] = []
        self.on_receipts: list[ReceiptListener] = []
        self.writer: Combiner[Send, Message | Response] = Combiner(self._write, max_batch)
        # The group commit's kept connection; on MariaDB it sends packets of statements (meeting.storage.packets).
        self._writer_conn = WriterConnection(engine)
        # A storm's sync points: up to push.sync_point_lanes statements in flight (see sync_point).
        self._sync_points: Combiner[tuple[int, int], SyncPoint] = Combiner(
            self._sync_points_of, sync_point_batch, name="ws-sync-points", max_in_flight=sync_point_lanes)
        self._writing = 0  # see _write_op
        self._settled = asyncio.Event()
        self._settled.set()
        self.reading = Reads(engine, self._reads, cache, transaction_attempts, RecipientLists(), self.on_read, self.on_receipts,
                           self._notify, self.unread_count)

    @property
    def recipients(self) -> RecipientLists:
        """The recipient lists of the messages sent here, which the sender's views attach
        (kept by Reads, which reads them; replaceable, as on another instance)."""
        return self.reading.recipients

    @recipients.setter
    def recipients(self, lists: RecipientLists) -> None:
        self.reading.recipients = lists

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Count a write while it runs: a service write (`_write_op`), or a whole write
        request (web.writes_middleware), which may still be authenticating when shutdown
        begins and would otherwise commit after the sockets it should reach were closed."""
        self._writing += 1
        self._settled.clear()
        try:
            yield
        finally:
            self._writing -= 1
            if not self._writing:
                self._settled.set()

    async def settle(self, timeout: float) -> bool:
        """Wait until no write is in flight and the group-commit writer is idle: every
        message accepted so far is committed and handed to the listeners. False on timeout."""
        try:  # shielded: a timeout must not cancel the writer in the middle of its transaction
            await asyncio.wait_for(asyncio.shield(asyncio.gather(self._settled.wait(), self.writer.close())), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d write(s) still in flight after %.1f s", self._writing, timeout)
            return False
        return True

    async def close(self) -> None:
        await self.writer.close()
        await self._sync_points.close()
        await self._writer_conn.close()

    @_write_op
    async def in_batch(self, work: Callable[[Batch], Awaitable[T]]) -> T:
        """Run `work` with a Batch in one transaction, then publish what it sent. After a
        deadlock it runs again, whole, on a fresh Batch: so `work` is a function, not a
        block, and must do nothing outside the transaction."""
        batch: Batch | None = None

        async def attempt(conn: AsyncConnection) -> T:
            nonlocal batch
            batch = Batch(conn)  # a retry starts from nothing sent
            return await work(batch)

        try:
            result = await transaction(self._engine, attempt, self._attempts)
        except CommitFailed as exc:
            assert batch is not None
            await self._settle(exc, batch.proof)
            result = exc.result
        assert batch is not None
        await self._after_commit(batch.stored)
        return result

    @_write_op
    async def send_message(self, sender_id: int, recipient_ids: Iterable[int], content: str,
                           meeting_id: int | None = None, once: Once | None = None) -> Message | Response:
        """Concurrent sends share a transaction (see meeting.combine): same
        guarantees, a fraction of the round trips. With `once` (an Idempotency-Key)
        the answer is the Response, first or replayed."""
        send = Send(draft(sender_id, recipient_ids, content, meeting_id=meeting_id), once)
        try:
            return await self.writer.submit(send)
        except (KeyTaken, NotApplied):  # nothing was stored; with KeyTaken another instance's send
            try:  # with this key committed first: now its row answers
                return await self.writer.submit(send)
            except KeyTaken as exc:  # twice: not a race we understand; nothing stored, so 409, not 500
                raise key_in_use() from exc

    async def _write(self, sends: list[Send]) -> list[Message | Response | Exception]:
        drafts, onces = [s.draft for s in sends], [s.once for s in sends]
        try:
            try:  # new keys are the rule: the first attempt skips their lookup (see meeting.idempotency)
                results = await self._first_attempt(drafts, onces)
            except KeyTaken:  # a key was stored before: nothing of this attempt was; look them up
                results = await self._writer_conn.transaction(lambda conn: store_drafts(conn, drafts, self.keys, onces), self._attempts)
        except Unavailable as exc:  # a busy database: trying each draft alone would only take longer
            return [exc] * len(drafts)
        except CommitFailed as exc:
            results = exc.result
            stored = fresh(results)
            if stored and not await self._settle(exc, _message_proof(stored[0]), unknown_ok=True):
                return [commit_unknown() if _needs_commit(r) else r for r in results]
        await self._after_commit(fresh(results))
        return list(results)

    async def _first_attempt(self, drafts: list[store.Draft], onces: list[Once | None]) -> list[Any]:
        """Packed where it can be (meeting.storage.packets); a packed batch that named an
        unknown user was rolled back, and runs again unpacked, which answers it per draft."""
        writer = self._writer_conn
        # aiomysql only, and MySQL has no INSERT ... RETURNING, MariaDB has since 10.5. Asked of
        # the server's version, not of the dialect's flag: SQLAlchemy caches that flag when first
        # read, as False if the engine had not connected yet, which would turn packing off for good.
        dialect = self._engine.dialect
        packs = (dialect.driver == "aiomysql" and getattr(dialect, "is_mariadb", False)
                 and (dialect.server_version_info or ()) >= (10, 5))
        if packs and packable(drafts, look=False):
            try:
                return await writer.transaction(
                    lambda packets: store_drafts(packets.conn, drafts, self.keys, onces, look=False, packets=packets),
                    self._attempts, packed=True)
            except store.UnknownUsers as exc:
                log.info("a packed batch named unknown users %s; running it unpacked", exc)
        return await writer.transaction(lambda conn: store_drafts(conn, drafts, self.keys, onces, look=False), self._attempts)

    async def _settle(self, exc: CommitFailed, proof: Proof | None, unknown_ok: bool = False) -> bool:
        """After a failed COMMIT: True if the transaction was applied, or wrote nothing (carry
        on); NotApplied if it was not (nothing stored: as safe to retry as a failure before the
        commit); if nobody can tell, False with `unknown_ok`, else CommitUnknown."""
        if proof is None:
            return True
        try:
            async with self._engine.begin() as conn:
                applied = await proof(conn)
        except Exception as check:
            log.error("commit outcome unknown: %s; asking the database failed too: %s", exc, check)
            if unknown_ok:
                return False
            raise commit_unknown() from exc
        log.warning("a COMMIT failed (%s); the transaction was %s", exc, "applied" if applied else "not applied")
        if not applied:
            raise NotApplied("The database connection was lost while committing; nothing was stored. Retry.") from exc
        return True

    async def _after_commit(self, stored: list[Message]) -> None:
        """Never raises: the messages are committed, whatever happens here."""
        if not stored:
            return
        for message in stored:
            self.recipients.remember(message["id"], message["recipient_ids"])
        try:
            await self._cache.invalidate({r for m in stored for r in m["recipient_ids"]})
        except Exception:
            log.exception("cache invalidation failed after commit")
        for message in stored:
            await self._notify(self.on_stored, message)

    async def _notify(self, listeners: list[Any], *args: Any) -> None:
        """The data is committed whatever a listener does: log its failure, never raise it."""
        for listener in listeners:
            try:
                await listener(*args)
            except Exception:
                log.exception("message listener %r failed", listener)

    async def received(self, user_id: int, limit: int = PAGE_SIZE, before: int | None = None,
                       after_seq: int | None = None) -> dict[str, Any]:
        """Newest first by id, or with `after_seq` oldest first by seq (catching up)."""
        if after_seq is not None:
            return await self.after_seq(user_id, after_seq, limit)

        async def fetch() -> list[Message]:
            async with self._reads.connect() as conn:
                return await store.received(conn, user_id, limit + 1, before)

        if before is None and limit == PAGE_SIZE:
            rows = await self._cache.get(INBOX, user_id, fetch, _encode_rows, _decode_rows)
        else:
            rows = await fetch()
        return _page(rows, limit) | {"next_after_seq": None}  # both cursors, always: one is null

    # The sender's view and marking read live in meeting.reads (self.reading).

    async def sent(self, user_id: int, limit: int = PAGE_SIZE, before: int | None = None) -> dict[str, Any]:
        return await self.reading.sent(user_id, limit, before)

    async def receipts(self, user_id: int, message_id: int, limit: int = 100, after: int | None = None,
                       unread: bool = False) -> dict[str, Any]:
        return await self.reading.receipts(user_id, message_id, limit, after, unread)

    async def read_counts(self, message_ids: list[int]) -> dict[int, int]:
        return await self.reading.read_counts(message_ids)

    async def unread(self, user_id: int, limit: int = PAGE_SIZE, after_seq: int | None = None) -> dict[str, Any]:
        """A page of unread messages oldest first, keyset on seq: the next page starts
        after `next_after_seq` (None on the last page); `count` is every unread message."""
        rows = await self.unread_rows(user_id, limit + 1, after_seq)
        page = rows[:limit]
        return {"messages": page, "count": await self.unread_count(user_id),
                "next_after_seq": page[-1]["seq"] if len(rows) > limit else None}

    async def unread_rows(self, user_id: int, limit: int, after_seq: int | None = None,
                          upto_seq: int | None = None) -> list[Message]:
        """Unread messages in seq order, without the total (callers paging count once)."""
        async with self._reads.connect() as conn:
            return await store.unread(conn, user_id, limit, after_seq, upto_seq)

    async def sync_point(self, user_id: int, page: int) -> SyncPoint:
        """Where a new device starts: the user's last seq, the unread count as of it, and
        the first `page` unread messages up to it. A reconnect storm asks this once per
        device: the devices that connect together share one statement for it all, up to
        `push.sync_point_batch` devices; a second statement (up to `push.sync_point_lanes` in
        flight) starts only once a whole batch waits (see Combiner: small statements in
        parallel cost the database more than a few full ones)."""
        return await self._sync_points.submit((user_id, page))

    async def _sync_points_of(self, asks: list[tuple[int, int]]) -> list[SyncPoint | Exception]:
        try:
            async with self._reads.connect() as conn:
                points = await store.sync_points(conn, sorted({user_id for user_id, _ in asks}), max(page for _, page in asks))
        except Exception as exc:  # no user's fault (a read): each alone would only fail again, one after another
            return [exc] * len(asks)
        return [(point[0], point[1], point[2][:page]) if (point := points.get(user_id)) else (0, 0, [])
                for user_id, page in asks]

    async def last_seq(self, user_id: int) -> int:
        """Where a resuming device's replay ends (it goes on if more arrives meanwhile)."""
        async with self._reads.connect() as conn:
            return await store.last_seq(conn, user_id)

    async def unread_count_upto(self, user_id: int, seq: int) -> int:
        """Unread messages with seq <= `seq`: the count that goes with a sync point."""
        async with self._reads.connect() as conn:
            return await store.count_unread(conn, user_id, upto_seq=seq)

    async def received_after_seq(self, user_id: int, after: int, limit: int) -> list[Message]:
        async with self._reads.connect() as conn:
            return await store.received_after_seq(conn, user_id, after, limit)

    async def after_seq(self, user_id: int, after: int, limit: int = PAGE_SIZE) -> dict[str, Any]:
        """Catch-up by seq: what the user received after `after`, oldest first."""
        rows = await self.received_after_seq(user_id, after, limit + 1)
        page = rows[:limit]
        return {"messages": page, "next_before": None, "next_after_seq": page[-1]["seq"] if len(rows) > limit else None}

    async def unread_count(self, user_id: int) -> int:
        async def fetch() -> int:
            async with self._reads.connect() as conn:
                return await store.count_unread(conn, user_id)

        return await self._cache.get(UNREAD, user_id, fetch, str, int)

    async def get(self, user_id: int, message_id: int) -> Message:
        """Its sender gets the sender's view (`recipient_ids`, `read_count`), a recipient only
        their own: whose view it is, `sender_id == user_id` tells."""
        async with self._reads.connect() as conn:
            message = await store.visible(conn, user_id, message_id)
            if message is None:
                raise NotFound("No such message.")
            if message["sender_id"] != user_id:
                return message
            return (await self.reading.attach(conn, [message]))[0]

    @_write_op
    async def mark_one_read(self, user_id: int, message_id: int) -> dict[str, Any]:
        return await self.reading.mark_one(user_id, message_id)

    @_write_op
    async def mark_read(self, user_id: int, ids: list[int] | None, *, strict: bool = False) -> dict[str, Any]:
        return await self.reading.mark(user_id, ids, strict=strict)
