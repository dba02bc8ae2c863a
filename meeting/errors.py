"""Domain errors: services raise these; one middleware turns them into JSON responses.

Services never see HTTP, so each error carries only a stable snake_case code,
a human message and optional details; the status lives in the mapping here,
the single place that knows both worlds.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status = 400
    code = "bad_request"
    #: Seconds a client should wait before trying again (sent as Retry-After), if it may.
    retry_after: int | None = None

    def __init__(self, message: str, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class BadRequest(DomainError):
    status, code = 400, "bad_request"


class Unauthorized(DomainError):
    status, code = 401, "unauthorized"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class NotFound(DomainError):
    status, code = 404, "not_found"


class Conflict(DomainError):
    status, code = 409, "conflict"


class TooManyRequests(DomainError):
    """A rate limit (meeting.ratelimit); `retry_after` says when a place frees up."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int, details: dict[str, Any] | None = None):
        super().__init__(message, details)
        self.retry_after = retry_after


class Invalid(DomainError):
    """Well-formed input that breaks a rule (unknown recipients, schema errors)."""

    status, code = 422, "validation_error"


class Unavailable(DomainError):
    """Nothing was stored and trying again later is safe."""

    status, code, retry_after = 503, "unavailable", 1
