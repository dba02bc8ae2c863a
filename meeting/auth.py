"""Identity: password hashing, JWT access tokens, registration and login.

Argon2 is deliberately slow (tens of milliseconds and `hash_memory_kib` each), so
hashing and verifying run on a few threads of their own (`auth.hash_workers`): a
burst of logins must not stall live websockets, nor queue behind every other use of
the default executor. The wait for a thread is bounded in count (`auth.hash_queue`):
past it a login answers 503 with Retry-After at once, instead of every real login
waiting seconds behind an attacker's hundreds.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import jwt
from jwt import PyJWK
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import AuthConfig
from .db import readers
from .errors import Conflict, Unauthorized, Unavailable
from .ratelimit import RateLimits
from .sessions import Sessions, revoked_error
from .storage import sessions as session_store
from .storage import users as user_store

log = logging.getLogger(__name__)
ALGORITHM = "HS256"


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    session_id: int
    expires_at: dt.datetime


class TokenCodec:
    """HS256 only: the algorithm list is pinned on decode, so `alg: none` or RS/HS confusion is refused."""

    def __init__(self, secret: str, ttl: int, issuer: str = "meeting", audience: str = "meeting",
                 cache_size: int = 10_000, clock: Callable[[], float] = time.time):
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        # Prepared once: PyJWT otherwise re-prepares (and PEM-sniffs) a str key on every decode.
        self._key = PyJWK({"kty": "oct", "k": base64.urlsafe_b64encode(secret.encode()).rstrip(b"=").decode()}, ALGORITHM)
        self.ttl = ttl
        self._clock = clock
        # Verified tokens until they expire: a client sends the same token with
        # every request, and PyJWT's decode was ~10 % of a send's CPU. Bounded,
        # oldest first out; only tokens that verified are kept.
        self._verified: dict[str, TokenClaims] = {}
        self._cache_size = cache_size

    def issue(self, user_id: int, session_id: int, now: dt.datetime | None = None) -> str:
        """An access token of that login (meeting.sessions): revoking the session ends it."""
        now = now or dt.datetime.now(dt.timezone.utc)
        claims = {"sub": str(user_id), "sid": session_id, "iss": self._issuer, "aud": self._audience,
                  "iat": now, "exp": now + dt.timedelta(seconds=self.ttl)}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def decode(self, token: str) -> TokenClaims:
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at.timestamp() > self._clock():
                return known
            del self._verified[token]
            raise Unauthorized("The access token has expired.", code="token_expired")
        claims = self._verify(token)
        if len(self._verified) >= self._cache_size:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> TokenClaims:
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], issuer=self._issuer, audience=self._audience,
                                options={"require": ["sub", "sid", "iss", "aud", "iat", "exp"]})
            user_id = int(claims["sub"])
            session_id = claims["sid"]
            if not isinstance(session_id, int) or isinstance(session_id, bool):
                raise ValueError("sid")
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The access token has expired.", code="token_expired") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise Unauthorized("The access token is invalid.", code="invalid_token") from None
        return TokenClaims(user_id, session_id, dt.datetime.fromtimestamp(claims["exp"], dt.timezone.utc))


class AuthService:
    def __init__(self, engine: AsyncEngine, tokens: TokenCodec, cfg: AuthConfig, limits: RateLimits, sessions: Sessions):
        self._engine = engine
        self._limits = limits
        self._sessions = sessions
        self._refresh_ttl = dt.timedelta(seconds=cfg.refresh_ttl)
        self._reads = readers(engine)
        self._tokens = tokens
        self._hasher = PasswordHasher(time_cost=cfg.hash_time_cost, memory_cost=cfg.hash_memory_kib)
        # Verified against when the username is unknown, so both failures take the same time.
        self._dummy_hash = self._hasher.hash("not-a-real-password")
        self._executor = ThreadPoolExecutor(cfg.hash_workers, thread_name_prefix="argon2")
        self._admitted = cfg.hash_workers + cfg.hash_queue  # running or waiting
        self._in_flight = 0

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _in_executor(self, fn: Any, *args: Any) -> Any:
        if self._in_flight >= self._admitted:
            raise Unavailable("Too many logins at once; try again in a moment.", code="auth_busy")
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._in_flight -= 1

    async def register(self, username: str, password: str, display_name: str | None) -> dict[str, Any]:
        username = username.lower()
        password_hash = await self._in_executor(self._hasher.hash, password)
        try:
            async with self._engine.begin() as conn:
                user = await user_store.insert(conn, username, display_name or username, password_hash)
        except user_store.UsernameTaken:
            raise Conflict("That username is already taken.", code="username_taken") from None
        log.info("registered user %s", user["id"])
        return user

    async def _rehash(self, user_id: int, password: str) -> None:
        try:
            password_hash = await self._in_executor(self._hasher.hash, password)
        except Unavailable:
            return  # next login, then
        async with self._engine.begin() as conn:
            await user_store.set_password_hash(conn, user_id, password_hash)
        log.info("password hash of user %s upgraded to the current cost settings", user_id)

    async def login(self, username: str, password: str) -> dict[str, Any]:
        """Failed logins are counted per username (guessing one account's password from
        many addresses); once over the limit even the right password waits. Each attempt
        counts before its password is checked, so a parallel burst cannot slip past the
        limit while the hashes run; a success clears the count."""
        username = username.lower()
        await self._limits.hit("login_failures_per_username", username)
        async with self._reads.connect() as conn:
            user = await user_store.by_username(conn, username)
        stored = user["password_hash"] if user else self._dummy_hash
        try:
            await self._in_executor(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            user = None
        if user is None:
            raise Unauthorized("Wrong username or password.", code="invalid_credentials")
        await self._limits.reset("login_failures_per_username", username)
        if self._hasher.check_needs_rehash(stored):  # the cost settings were raised since it was stored
            await self._rehash(user["id"], password)
        del user["password_hash"]
        async with self._engine.begin() as conn:
            session_id = await session_store.create(conn, user["id"])
            refresh_token = await self._new_refresh_token(conn, session_id)
        self._sessions.remember(session_id, user["id"])  # committed just now: its first request need not ask
        return {**self._tokens_of(user["id"], session_id, refresh_token), "user": user}

    def _tokens_of(self, user_id: int, session_id: int, refresh_token: str) -> dict[str, Any]:
        return {"access_token": self._tokens.issue(user_id, session_id), "token_type": "bearer",
                "expires_in": self._tokens.ttl, "refresh_token": refresh_token,
                "refresh_expires_in": int(self._refresh_ttl.total_seconds())}

    async def _new_refresh_token(self, conn: Any, session_id: int) -> str:
        """Opaque and random; only its SHA-256 is stored (a database leak hands out no session)."""
        token = secrets.token_urlsafe(32)
        await session_store.add_refresh_token(conn, session_id, _digest(token), dt.datetime.now(dt.timezone.utc) + self._refresh_ttl)
        return token

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A new access token and a new refresh token for the same session; the old refresh
        token is spent. Presenting a spent one means two parties hold it (a stolen copy):
        the whole session is revoked, the thief's tokens and the owner's alike."""
        digest = _digest(refresh_token)
        reused: tuple[int, int] | None = None
        async with self._engine.begin() as conn:
            row = await session_store.refresh_token_for_update(conn, digest)
            if row is None:
                raise Unauthorized("Unknown refresh token.", code="invalid_refresh_token")
            session_id, user_id = row["session_id"], row["user_id"]
            if row["revoked_at"] is not None:
                raise revoked_error()
            if row["used_at"] is not None:
                await session_store.revoke(conn, session_id)
                reused = (session_id, user_id)
            elif row["expires_at"] <= dt.datetime.now(dt.timezone.utc):
                raise Unauthorized("The refresh token has expired; log in again.", code="refresh_token_expired")
            else:
                await session_store.mark_used(conn, digest)
                new_refresh = await self._new_refresh_token(conn, session_id)
        if reused is not None:
            log.warning("a spent refresh token was presented again: session %s of user %s revoked", *reused)
            self._sessions.revoked([reused])
            raise Unauthorized("This refresh token was already used; the session is revoked. Log in again.",
                               code="refresh_token_reused")
        return self._tokens_of(user_id, session_id, new_refresh)

    async def logout(self, user_id: int, session_id: int) -> None:
        async with self._engine.begin() as conn:
            await session_store.revoke(conn, session_id)
        self._sessions.revoked([(session_id, user_id)])

    async def logout_all(self, user_id: int) -> int:
        async with self._engine.begin() as conn:
            ids = await session_store.revoke_all(conn, user_id)
        self._sessions.revoked([(session_id, user_id) for session_id in ids])
        return len(ids)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
