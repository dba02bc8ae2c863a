"""The Idempotency-Key request header (IETF httpapi draft): parsing, fingerprint, replay.

The key is a Structured Field string (`"8e03978e-..."`); the bare form without
quotes is accepted too and means the same key. It is 1 to `idempotency.max_key_length`
printable ASCII characters, not starting or ending with a space; anything else, or the
header twice, is 400 `invalid_idempotency_key`. The spaces are refused because MariaDB's
`ascii_bin` collation ignores trailing ones (PAD SPACE: 'k' = 'k '), SQLite does not:
refusing them keeps one key one key on both backends. The fingerprint is a SHA-256 of the method, the route and
the body as canonical JSON (sorted keys, no spaces), so key order or white space in
a retried body does not matter, but any value does.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web
from marshmallow import Schema

from ..errors import BadRequest
from ..idempotency import Once, Response
from ..typedefs import config_key
from .common import dumps, read_json, respond

HEADER = "Idempotency-Key"
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_BARE = re.compile(r"[\x20-\x7e]+")


def parse_key(values: list[str], max_length: int) -> str | None:
    """The key, or None without the header; BadRequest for a malformed one."""
    if not values:
        return None
    if len(values) > 1:
        raise _invalid("Send one Idempotency-Key header, not several.")
    raw = values[0].strip()
    if raw.startswith('"'):
        match = _SF_STRING.fullmatch(raw)
        if match is None:
            raise _invalid('A quoted Idempotency-Key is a Structured Field string: printable ASCII, with \\" and \\\\ escaped.')
        key = re.sub(r"\\(.)", r"\1", match.group(1))
    else:
        if _BARE.fullmatch(raw) is None:
            raise _invalid("An Idempotency-Key is printable ASCII.")
        key = raw
    if not 1 <= len(key) <= max_length:
        raise _invalid(f"An Idempotency-Key has 1 to {max_length} characters.")
    if key != key.strip(" "):
        raise _invalid("An Idempotency-Key does not start or end with a space.")
    return key


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_idempotency_key")


def fingerprint(method: str, route: str, body: Any) -> str:
    canonical = json.dumps({"method": method, "route": route, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def keyed_body(request: web.Request, schema: Schema, response: Schema, status: int) -> tuple[Any, Once | None]:
    """The validated body, and the request's Once if it has an Idempotency-Key (checked first:
    a bad key is 400 whatever the body)."""
    key = parse_key(request.headers.getall(HEADER, []), request.app[config_key].idempotency.max_key_length)
    data = await read_json(request)
    body = schema.load(data)
    if key is None:
        return body, None
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path

    def render(result: Any) -> Response:
        return Response(status, dumps(response.dump(result)))

    return body, Once(key, fingerprint(request.method, route, data), render)


def respond_keyed(schema: Schema, result: Any, status: int) -> web.Response:
    """A keyed request answers its Response (first or replayed: the same bytes); others as usual."""
    if isinstance(result, Response):
        return web.Response(status=result.status, text=result.body, content_type="application/json")
    return respond(schema, result, status=status)
