"""Every typed key of the application and of requests, in one place.

Keys are typed so that handlers get precise types from ``request.app[key]`` and
so that aiohttp does not warn about string keys (tests turn warnings into errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from .auth import AuthService, TokenCodec
    from .breaker import RedisBreaker
    from .redis_client import Client
    from .cache import MessageCache
    from .config import Config
    from .deadlines import Deadlines
    from .meetings import MeetingService
    from prometheus_client import CollectorRegistry

    from .messages import MessageService
    from .metrics import PushStats
    from .presence import Presence
    from .ratelimit import RateLimits
    from .sessions import Sessions
    from .push import PushHub
    from .rooms import RoomManager
    from .users import UserService
    from .ws import UserConnection

config_key = web.AppKey("config", "Config")
engine_key = web.AppKey("engine", "AsyncEngine")
redis_key = web.AppKey("redis", "Client | None")
#: The one circuit breaker for every use of Redis in this process (meeting.breaker).
redis_breaker_key = web.AppKey("redis_breaker", "RedisBreaker")
tokens_key = web.AppKey("tokens", "TokenCodec")
sessions_key = web.AppKey("sessions", "Sessions")
auth_service_key = web.AppKey("auth_service", "AuthService")
user_service_key = web.AppKey("user_service", "UserService")
cache_key = web.AppKey("cache", "MessageCache")
message_service_key = web.AppKey("message_service", "MessageService")
meeting_service_key = web.AppKey("meeting_service", "MeetingService")
presence_key = web.AppKey("presence", "Presence")
limits_key = web.AppKey("limits", "RateLimits")
push_hub_key = web.AppKey("push_hub", "PushHub")
#: The connection map: user id -> that user's live /ws/messages connections.
ws_users = web.AppKey("ws_users", "dict[int, set[UserConnection]]")
metrics_key = web.AppKey("metrics", "CollectorRegistry")
stats_key = web.AppKey("stats", "PushStats")
#: meeting id -> the sockets in that meeting's room (separate from user push connections).
rooms_key = web.AppKey("rooms", "RoomManager")
#: Every socket's token expiry, under one timer (meeting.deadlines).
deadlines_key = web.AppKey("deadlines", "Deadlines")

#: The authenticated user's id, set by the auth middleware from the JWT.
user_id_key = web.RequestKey("user_id", int)
#: The login (auth_sessions row) the request's token belongs to: what POST /auth/logout ends.
session_id_key = web.RequestKey("session_id", int)
