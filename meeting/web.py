"""The application factory, the route table and the middlewares.

`create_app(config)` is the only way an app is built, by `python -m meeting`
and by the tests alike; every resource it needs is opened and closed by a
cleanup context, in the order listed in `_resources`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from marshmallow import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from . import db, frontend
from .auth import AuthService, TokenCodec
from . import signing
from .cluster_broker import redis_broker
from .config import Config, with_overrides
from .deadlines import Deadlines
from .errors import DomainError, Unauthorized
from .cache import MessageCache
from .handlers import auth, health, meetings, messages, presence, rooms, users
from .handlers.common import ID, Handler, authenticate, bearer_token, error_response
from .idempotency import Keys, prune_ctx
from .redis_client import redis_ctx
from .meetings import MeetingService
from .metrics import metrics, setup_metrics
from .openapi import openapi_json
from .presence import Presence
from .ratelimit import RateLimits
from .sessions import Sessions
from .push import push_ctx
from .messages import MessageService
from .rooms import RoomManager
from .typedefs import (
    auth_service_key, cache_key, config_key, engine_key, limits_key, meeting_service_key, message_service_key,
    deadlines_key, presence_key, push_hub_key, redis_breaker_key, rooms_key, session_id_key, sessions_key, stats_key,
    tokens_key, user_id_key, user_service_key, ws_users,
)
from .users import UserService
from .ws import messages_ws

log = logging.getLogger(__name__)

#: Stable codes for errors raised by aiohttp itself (routing, body size).
HTTP_ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 422: "validation_error",
}


def setup_routes(app: web.Application) -> None:
    app.router.add_routes([
        web.get("/healthz", health.healthz),
        web.get("/openapi.json", openapi_json),
        web.post("/auth/register", auth.register),
        web.post("/auth/login", auth.login),
        web.post("/auth/refresh", auth.refresh),
        web.post("/auth/logout", auth.logout),
        web.post("/auth/logout-all", auth.logout_all),
        web.get("/users/me", users.me),
        web.get(f"/users/{ID}", users.get_user),
        web.get("/users", users.search),
        web.post("/messages", messages.send),
        web.get("/messages", messages.received),
        web.get("/messages/sent", messages.sent),
        web.get("/messages/unread", messages.unread),
        web.get("/messages/unread/count", messages.unread_count),
        web.post("/messages/read", messages.read_many),
        web.get(f"/messages/{ID}", messages.get_one),
        web.post(f"/messages/{ID}/read", messages.read_one),
        web.get(f"/messages/{ID}/receipts", messages.receipts),
        web.post("/meetings", meetings.create),
        web.get("/meetings", meetings.list_mine),
        web.get(f"/meetings/{ID}", meetings.get_one),
        web.get(f"/ws/meetings/{ID}", rooms.room),
        web.get(f"/users/{ID}/presence", presence.one),
        web.get("/presence", presence.many),
        *frontend.routes(),
    ])
    if app[config_key].push.enabled:
        app.router.add_get("/ws/messages", messages_ws)
    if app[config_key].metrics.enabled:
        app.router.add_get("/metrics", metrics)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {...}}` JSON; tracebacks stay in the log."""
    try:
        return await handler(request)
    except DomainError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers=headers)
    except ValidationError as exc:
        return error_response(422, "validation_error", "The request is not valid.", exc.normalized_messages())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = HTTP_ERROR_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))
        return error_response(exc.status, code, exc.reason, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except (OperationalError, InterfaceError) as exc:  # the database is down or unreachable: not our bug
        log.warning("database unavailable on %s %s: %s", request.method, request.path, type(exc.orig).__name__)
        return error_response(503, "database_unavailable", "The database is unavailable; try again.", headers={"Retry-After": "1"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "Something went wrong on our side.")


@web.middleware
def writes_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """A request that may write is counted from its arrival to its answer, so that on
    SIGTERM `drain_then_close` waits for it (aiohttp takes no new requests by then) and
    every 201 it answers reached this instance's sockets before they are told 1001.

    Not a coroutine itself: a read passes straight through, so a WebSocket (a GET that
    lasts hours) holds no suspended frame of this middleware (about 250 bytes each)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return handler(request)
    return _counted(request, handler)


async def _counted(request: web.Request, handler: Handler) -> web.StreamResponse:
    async with request.app[message_service_key].writing():
        return await handler(request)


@web.middleware
def auth_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Routes need a bearer token unless their handler is marked `@public`. Public routes
    (both WebSockets among them) pass straight through, as in writes_middleware."""
    if getattr(request.match_info, "http_exception", None) is not None or getattr(request.match_info.handler, "public", False):
        return handler(request)
    return _authenticated(request, handler)


async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("A bearer token is required.", code="missing_token")
    claims = await authenticate(request.app, token)
    request[user_id_key] = claims.user_id
    request[session_id_key] = claims.session_id
    return await handler(request)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration. Never the query
    string, where WebSocket clients may carry their token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.1fms", request.method, request.path, response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[config_key]
    tokens = TokenCodec(cfg.auth.secret, cfg.auth.token_ttl, cfg.auth.issuer, cfg.auth.audience)
    app[tokens_key] = tokens
    app[sessions_key] = Sessions(app[engine_key], cfg.auth.token_ttl)
    app[limits_key] = RateLimits(cfg.limits, app[redis_breaker_key], cfg.redis)
    app[auth_service_key] = AuthService(app[engine_key], tokens, cfg.auth, app[limits_key], app[sessions_key])
    app[user_service_key] = UserService(app[engine_key])
    app[cache_key] = MessageCache(app[redis_breaker_key], cfg.redis)
    app[message_service_key] = MessageService(app[engine_key], app[cache_key],
                                              transaction_attempts=cfg.database.transaction_attempts,
                                              keys=Keys(cfg.idempotency.ttl), sync_point_batch=cfg.push.sync_point_batch,
                                              sync_point_lanes=cfg.push.sync_point_lanes)
    app[meeting_service_key] = MeetingService(app[engine_key], app[message_service_key])
    app[presence_key] = Presence(app[redis_breaker_key], cfg.redis, cfg.push.heartbeat, cfg.push.admit_batch)
    stats = app[stats_key]

    async def count_stored(message: dict[str, object]) -> None:
        stats.messages_stored += 1

    app[message_service_key].on_stored.append(count_stored)
    poller = asyncio.create_task(app[sessions_key].run(cfg.auth.revocation_poll), name="session-revocations")
    yield
    poller.cancel()
    await asyncio.gather(poller, return_exceptions=True)
    await app[message_service_key].close()  # writes already accepted are finished, not dropped
    await app[presence_key].close()
    app[auth_service_key].close()
    await app[limits_key].close()


async def drain_then_close(app: web.Application) -> None:
    """on_shutdown (SIGTERM): aiohttp has stopped accepting; requests under way still run.
    Nothing committed may be lost to live delivery, so in order: let in-flight writes
    finish, publish what they committed (the broker's outbox), let every local socket
    write what is queued for it, and only then tell each client 1001 (reconnect
    elsewhere). The three waits share one budget, `server.shutdown_timeout`.

    By now aiohttp takes no new requests, not even on kept-alive connections, and
    `settle` also waits for every write request under way (writes_middleware), so each
    one answered 201 was handed to push before the sockets close. One that outlasts the
    budget still commits and is published before the broker closes (see push_ctx), but
    this instance's own devices then learn of it only when they reconnect with `since`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app[config_key].server.shutdown_timeout
    await app[message_service_key].settle(deadline - loop.time())
    closing = [app[rooms_key].close_all()]
    if push_hub_key in app:
        hub = app[push_hub_key]
        await hub.flush(max(0.0, deadline - loop.time()))
        closing.append(hub.close_all(drain=max(0.0, deadline - loop.time())))
    await asyncio.gather(*closing)


async def deadlines_ctx(app: web.Application) -> AsyncIterator[None]:
    """Both sockets' token expiries, under one timer (meeting.deadlines)."""
    app[deadlines_key] = Deadlines()
    yield
    app[deadlines_key].close()


async def rooms_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rooms and their broker (Redis when configured, so one room spans every instance)."""
    rooms = RoomManager()
    redis_cfg = app[config_key].redis
    if redis_cfg.url:  # one path per configuration, as for user push
        rooms.broker = redis_broker(redis_cfg, rooms.deliver_local, None, rooms.wants, app[redis_breaker_key], kind="room")
    await rooms.broker.start()
    app[rooms_key] = rooms
    app[sessions_key].on_revoked.append(rooms.sessions_revoked)
    yield
    app[sessions_key].on_revoked.remove(rooms.sessions_revoked)
    await rooms.close_all()
    await rooms.drain_background()
    await rooms.broker.close(flush=app[config_key].server.shutdown_timeout)  # the last meeting.left frames


def create_app(config: Config) -> web.Application:
    """Raises ConfigError when there is no usable JWT secret (see meeting.signing)."""
    config = with_overrides(config, auth={"secret": signing.resolve(config)})
    app = web.Application(
        middlewares=[writes_middleware, error_middleware, auth_middleware],
        client_max_size=config.server.max_body_size,
    )
    app[config_key] = config
    app[ws_users] = {}
    setup_metrics(app)
    resources = [db.engine_ctx, redis_ctx, deadlines_ctx, services_ctx, rooms_ctx, prune_ctx]
    if config.push.enabled:  # push off: no route, no listener; storing and pulling unchanged
        resources.append(push_ctx)
    app.cleanup_ctx.extend(resources)
    app.on_shutdown.append(drain_then_close)
    app.on_response_prepare.append(frontend.security_headers)
    setup_routes(app)
    return app
