"""The plumbing every handler shares: body/query parsing and JSON responses."""

from __future__ import annotations

import functools
import json
from typing import Any, Awaitable, Callable, TypeVar

from aiohttp import web
from marshmallow import Schema

from ..auth import TokenClaims

from ..errors import BadRequest, Forbidden, Invalid, NotFound
from ..typedefs import config_key, limits_key, sessions_key, tokens_key

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


#: UTF-8 on the wire: Chinese text and emoji are not escaped to \uXXXX pairs.
dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))

#: Deepest JSON nesting accepted in a body or a WebSocket frame. Ours is at most 3 deep;
#: without a bound, 10,000 nested brackets reached Python's recursion limit (a 500).
MAX_JSON_DEPTH = 32


def decode_json(raw: bytes | str) -> Any:
    """JSON from a client, for REST bodies and WebSocket frames alike: 400 when it is not
    JSON or nests deeper than MAX_JSON_DEPTH, 422 when a string is not valid Unicode (a
    lone surrogate such as "\\ud800" is valid JSON but cannot be stored or sent as UTF-8)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, path or "_key")
                stack.append((item, depth + 1, f"{path}.{key}".lstrip(".")))
    return data


def _too_deep() -> BadRequest:
    return BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep")


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("A string is not valid Unicode (lone surrogate).", {path or "_schema": ["Not valid Unicode text."]},
                      code="invalid_text") from None


def doc(summary: str, *, body: type[Schema] | None = None, query: type[Schema] | None = None,
        response: tuple[int, type[Schema] | dict[str, Any] | None] = (200, None), errors: tuple[int, ...] = (),
        also: tuple[tuple[int, type[Schema], str], ...] = (), tag: str = "", idempotent: bool = False,
        database: bool = True, media: str | None = None) -> Callable[[H], H]:
    """Describe a handler for the OpenAPI document (see meeting.openapi). `errors` are
    the statuses it may answer with an Error body besides those every route of its kind
    has; `also`, other statuses with a body of their own: (status, schema, description);
    `idempotent`: it takes an Idempotency-Key header (see handlers.idempotency);
    `database`: it may reach the database, so it answers 503 while that is down;
    `media`: the 200 is a file of this media type, not JSON, revalidated by ETag (304)."""

    def mark(handler: H) -> H:
        handler.apidoc = {"summary": summary, "body": body, "query": query, "response": response,  # type: ignore[attr-defined]
                          "errors": errors, "also": also, "tag": tag, "description": (handler.__doc__ or "").strip(),
                          "idempotent": idempotent, "database": database, "media": media}
        return handler

    return mark


def public(handler: H) -> H:
    """Mark a handler as reachable without a bearer token."""
    handler.public = True  # type: ignore[attr-defined]
    return handler


async def read_json(request: web.Request) -> Any:
    """The body as parsed JSON, not validated yet."""
    if request.content_type != "application/json":
        raise BadRequest("The request body must be JSON (Content-Type: application/json).", code="unsupported_content_type")
    raw = await request.read()  # raises 413 past client_max_size
    return decode_json(raw)


async def parse_body(request: web.Request, schema: Schema) -> Any:
    return schema.load(await read_json(request))


def parse_query(request: web.Request, schema: Schema) -> Any:
    """Without a query string (a push socket that is not resuming) none is parsed: aiohttp
    would keep the parsed empty query (~200 bytes) for the request's life, a socket's."""
    return schema.load(dict(request.query) if "?" in request.raw_path else {})


#: A path id: ASCII digits only (`\d` also matches other scripts' digits), at most 19 of them.
ID = r"{id:[0-9]{1,19}}"


async def authenticate(app: web.Application, token: str) -> TokenClaims:
    """A token's claims, if it is well signed, current, and its session still live: REST,
    both WebSockets and the `refresh` frame all ask this, so a logout holds everywhere."""
    claims = app[tokens_key].decode(token)
    await app[sessions_key].check(claims.session_id, claims.user_id)
    return claims


async def limit(request: web.Request, rule: str, *identity: object) -> None:
    """Count this request against a rate limit (meeting.ratelimit): 429 past it."""
    await request.app[limits_key].hit(rule, *identity)


def client_address(request: web.Request) -> str:
    return request.app[limits_key].client_address(request)


def _origin(value: str) -> str:
    """Scheme and host compare case-insensitively; a default port is no port."""
    origin = value.strip().rstrip("/").lower()
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


async def admit_websocket(request: web.Request, user_id: int) -> None:
    """Both WebSockets, before the upgrade: a page from an origin not in
    `push.allowed_origins` gets a 403 (a browser always sends Origin; other clients
    need not), and a reconnect loop gone wild gets a 429."""
    allowed = request.app[config_key].push.allowed_origins
    origin = request.headers.get("Origin")
    if allowed and origin is not None and _origin(origin) not in {_origin(o) for o in allowed.split(",")}:
        raise Forbidden("WebSockets from this origin are not allowed.", code="origin_not_allowed")
    await limit(request, "connects_per_address", client_address(request))
    await limit(request, "connects_per_user", user_id)


def path_id(request: web.Request, name: str = "id") -> int:
    """Route ids are matched as 1-19 ASCII digits; one too large for a BIGINT cannot exist."""
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
