"""The plumbing every handler shares: body/query parsing and JSON responses."""

from __future__ import annotations

import functools
import json
from typing import Any, Awaitable, Callable, TypeVar

from aiohttp import web
from marshmallow import Schema

from ..errors import BadRequest, NotFound

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


#: UTF-8 on the wire: Chinese text and emoji are not escaped to \uXXXX pairs.
dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


def doc(summary: str, *, body: type[Schema] | None = None, query: type[Schema] | None = None,
        response: tuple[int, type[Schema] | None] = (200, None), errors: tuple[int, ...] = (), tag: str = "") -> Callable[[H], H]:
    """Describe a handler for the OpenAPI document (see meeting.openapi)."""

    def mark(handler: H) -> H:
        handler.apidoc = {"summary": summary, "body": body, "query": query, "response": response,  # type: ignore[attr-defined]
                          "errors": errors, "tag": tag, "description": (handler.__doc__ or "").strip()}
        return handler

    return mark


def public(handler: H) -> H:
    """Mark a handler as reachable without a bearer token."""
    handler.public = True  # type: ignore[attr-defined]
    return handler


async def parse_body(request: web.Request, schema: Schema) -> Any:
    if request.content_type != "application/json":
        raise BadRequest("The request body must be JSON (Content-Type: application/json).", code="unsupported_content_type")
    raw = await request.read()  # raises 413 past client_max_size
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    return schema.load(data)


def parse_query(request: web.Request, schema: Schema) -> Any:
    return schema.load(dict(request.query))


def path_id(request: web.Request, name: str = "id") -> int:
    """Route ids are matched as digits; one too large for a BIGINT cannot exist."""
    value = int(request.match_info[name])
    if value > 2**63 - 1:
        raise NotFound("Not found.")
    return value


def respond(schema: Schema, data: Any, status: int = 200) -> web.Response:
    return web.json_response(schema.dump(data), status=status, dumps=dumps)


def error_response(status: int, code: str, message: str, details: Any = None, headers: Any = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return web.json_response({"error": body}, status=status, headers=headers, dumps=dumps)


def bearer_token(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def websocket_token(request: web.BaseRequest) -> str | None:
    """A WebSocket token from, in order: the `bearer, <jwt>` subprotocol pair
    (browsers), the Authorization header, or the `token` query parameter."""
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if len(protocols) >= 2 and protocols[0].lower() == "bearer":
        return protocols[1]
    return bearer_token(request) or request.query.get("token") or None
