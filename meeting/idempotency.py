"""Idempotency keys: a POST retried with the same key answers what the first one did.

Semantics (IETF httpapi "The Idempotency-Key HTTP Header Field" draft; docs/api.md):
the first request with a key runs and, if it succeeds, its response (status and
body) is stored in the same transaction as what it created, so no crash can leave
a message or meeting without its key, nor a key without it. Within the TTL, the
same key from the same user with the same fingerprint (method, route, canonical
body) answers that response again and stores nothing; with another fingerprint it
answers 422 `idempotency_key_reused`. Only successes are kept: a request that
failed stored nothing, so its retry simply runs again.

A concurrent duplicate waits for the first instead of answering 409: in one
instance both sit in the same group-commit batch or consecutive ones (a batch
answers its later duplicate from its earlier one). In two transactions (two
instances) a send's lookup may run before the first commits and find nothing;
the second then waits on the sender's users row, which the first holds FOR
UPDATE until it commits, inserts its message, fails on the duplicate key
(KeyTaken: the transaction is rolled back, nothing stored) and runs once more
alone, when its lookup finds the first's row and replays it. If that retry fails
on the key again (a row the lookup cannot see), the answer is 409
`idempotency_key_in_use`, never a second copy. A meeting creation looks its key
up after locking the organizer's row, so one with the same key has committed
(and is replayed) or waits.

Keys are looked up (a plain read, no lock) inside the writing transaction before
anything is written, and inserted as its last statements, after every users lock
(an expired row of a key used again is deleted just before): the users-first
lock order is unchanged, and two sends with one key (same user) are serialised by
the sender's row lock anyway. The group commit first runs a batch without the
lookup (`look=False`), since nearly every key is new and the lookup is a round trip
of every keyed batch: the key's primary key still refuses a second row, so a key
that was stored before fails the insert (KeyTaken), the batch is rolled back whole,
and runs again with the lookup, exactly as above. A retried request thus costs a
rolled-back attempt more than it did; a first request, one statement less.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import utcnow
from .errors import Conflict, DomainError, Invalid
from .storage import idempotency as store
from .storage.packets import Packets
from .typedefs import config_key, engine_key

log = logging.getLogger(__name__)

#: Expired rows deleted per statement by the pruner (short transactions, short locks).
PRUNE_CHUNK = 1000


@dataclass(frozen=True)
class Response:
    """A response as it was sent: replayed byte for byte. Never stored: `fresh`, what a
    first request created (for post-commit work); `new`, true for an answer that holds
    only if this transaction commits (a first request, or its duplicate in the same batch)."""
    status: int
    body: str
    fresh: Any = field(default=None, compare=False, repr=False)
    new: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Once:
    """A request's Idempotency-Key, its fingerprint, and how to render its success."""
    key: str
    fingerprint: str
    render: Callable[[Any], Response]


class KeyReused(Invalid):
    code = "idempotency_key_reused"


def key_reused() -> KeyReused:
    return KeyReused("This Idempotency-Key was already used with another request (method, route or body).")


class KeyInUse(Conflict):
    """A key row the lookup did not find blocked the insert twice (a race lost twice, or a
    row the lookup cannot see): nothing was stored, and a retry with the key is safe."""

    code = "idempotency_key_in_use"


def key_in_use() -> KeyInUse:
    return KeyInUse("Another request with this Idempotency-Key got in the way: nothing was stored. Retry with the same key.")


@dataclass
class Claims:
    """What a lookup found: `answers` for the requests that must not run (see Keys.claim),
    and the expired rows of keys that may be used again (deleted by Keys.record)."""
    answers: dict[int, Response | DomainError | int] = field(default_factory=dict)
    expired: list[tuple[int, str]] = field(default_factory=list)
    cutoff: dt.datetime | None = None


class Keys:
    """Lookups and records for one transaction's keyed requests."""

    def __init__(self, ttl: float):
        self.ttl = dt.timedelta(seconds=ttl)

    async def claim(self, conn: AsyncConnection, asks: list[tuple[int, Once] | None], look: bool = True) -> Claims:
        """For each keyed request (index into `asks`) already answered: the stored
        response, `KeyReused`, or the index of an earlier request in `asks` with the
        same key (a duplicate in the same batch: answer it as that one is answered).
        Requests not in `answers` run. A plain read: it locks nothing. Without `look`,
        only the same-batch duplicates: the caller bets that no key was stored before,
        and `record` raises KeyTaken if one was (see the module's docstring)."""
        pairs = {i: (ask[0], ask[1].key) for i, ask in enumerate(asks) if ask is not None}
        if not pairs:
            return Claims()
        rows = await store.found(conn, pairs.values()) if look else {}
        cutoff = utcnow() - self.ttl
        claims = Claims(expired=[pair for pair, row in rows.items() if row["created_at"] < cutoff], cutoff=cutoff)
        answers = claims.answers
        first: dict[tuple[int, str], int] = {}
        for i, pair in pairs.items():
            once = asks[i][1]  # type: ignore[index]
            row = rows.get(pair)
            if row is not None and row["created_at"] >= cutoff:
                answers[i] = Response(row["status"], row["response"]) if row["fingerprint"] == once.fingerprint else key_reused()
            elif pair in first:
                answers[i] = first[pair]
            else:
                first[pair] = i
        return claims

    @staticmethod
    def duplicate(asks: list[tuple[int, Once] | None], i: int, earlier: int, outcome: Any) -> Any:
        """The answer of request `i`, a same-batch duplicate of `earlier`, given the earlier's outcome."""
        if asks[i][1].fingerprint != asks[earlier][1].fingerprint:  # type: ignore[index]
            return key_reused()
        if isinstance(outcome, Response):
            return Response(outcome.status, outcome.body, new=True)  # stored once, by the earlier one
        return outcome  # the same refusal: nothing was stored for either

    @staticmethod
    async def record(conn: AsyncConnection, done: list[tuple[int, Once, Response]], claims: Claims,
                     packets: Packets | None = None) -> None:
        """Store the responses of first requests: the transaction's last statements (after
        every users lock), deleting first the expired rows of the keys used again.
        Raises storage.idempotency.KeyTaken if a concurrent request took a key meanwhile.
        With `packets`, the rows go with the COMMIT (a packed batch never looked, so it
        has no expired rows to delete)."""
        reused = {(user_id, once.key) for user_id, once, _ in done}.intersection(claims.expired)
        if reused and claims.cutoff is not None:
            await store.forget(conn, reused, claims.cutoff)
        now = utcnow()
        await store.insert(conn, [{"user_id": user_id, "idempotency_key": once.key, "fingerprint": once.fingerprint,
                                   "status": response.status, "response": response.body, "created_at": now}
                                  for user_id, once, response in done], packets)


async def prune_once(engine: AsyncEngine, ttl: float) -> int:
    """Delete every expired row, a chunk per transaction; how many went."""
    before = utcnow() - dt.timedelta(seconds=ttl)
    total = 0
    while True:
        async with engine.begin() as conn:
            gone = await store.prune(conn, before, PRUNE_CHUNK)
        total += gone
        if gone < PRUNE_CHUNK:
            return total


async def prune_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: every instance prunes expired keys every `idempotency.prune_interval`
    seconds (several instances doing it is harmless: a row goes once). Lookups ignore
    expired rows meanwhile, so pruning only bounds the table's size."""
    cfg = app[config_key].idempotency
    engine = app[engine_key]

    async def run() -> None:
        while True:
            await asyncio.sleep(cfg.prune_interval)
            try:
                gone = await prune_once(engine, cfg.ttl)
                if gone:
                    log.info("pruned %d expired idempotency keys", gone)
            except Exception:
                log.exception("pruning idempotency keys failed; next try in %.0f s", cfg.prune_interval)

    task = asyncio.create_task(run(), name="idempotency-prune")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
