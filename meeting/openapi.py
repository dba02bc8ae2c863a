"""The OpenAPI 3 document, generated from the route table and the marshmallow schemas.

Each handler carries its description (`@doc`); this module only walks the
router, so a new route without a description is caught by the test that
checks every route is documented.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from .handlers.common import doc, dumps, public
from .schemas import ErrorSchema

ERROR_TEXT = {400: "Malformed request", 401: "Missing or bad token", 403: "Forbidden", 404: "Not found",
              409: "Conflict", 413: "Body too large", 422: "Validation error", 429: "Rate limited (see Retry-After)",
              503: "Temporarily unavailable: retry after Retry-After seconds"}

IDEMPOTENCY_KEY = {
    "in": "header", "name": "Idempotency-Key", "required": False,
    "description": ("Makes a retry safe (IETF httpapi Idempotency-Key draft): the same key from the same user within "
                    "idempotency.ttl (24 h) answers the first request's response again and stores nothing; with another "
                    "body, 422 idempotency_key_reused; a concurrent duplicate waits for the first. A Structured Field "
                    "string (quotes optional) of 1-255 printable ASCII characters, not starting or ending with a space, "
                    "e.g. a UUID; else 400 invalid_idempotency_key. 409 idempotency_key_in_use: nothing stored, retry "
                    "with the key. See docs/api.md."),
    "schema": {"type": "string", "minLength": 1, "maxLength": 257},
    "example": '"8e03978e-40d5-43e8-bc93-6894a57f9324"',
}


def build_spec(app: web.Application) -> dict[str, Any]:
    spec = APISpec(title="meeting", version="1", openapi_version="3.0.3", plugins=[MarshmallowPlugin()],
                   info={"description": "Meeting Assistant backend: users, messages, meetings and real-time push."})
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = getattr(route.handler, "apidoc", None)
        if route.method == "HEAD" or info is None:
            continue
        path = route.resource.canonical if route.resource else ""
        paths.setdefault(path, {})[route.method.lower()] = _operation(route.handler, info, path)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def _operation(handler: Any, info: dict[str, Any], path: str) -> dict[str, Any]:
    status, schema = info["response"]
    op: dict[str, Any] = {"summary": info["summary"], "tags": [info["tag"]] if info["tag"] else [],
                          "responses": {str(status): {"description": "Success"} | ({"content": {"application/json": {"schema": schema}}} if schema else {})}}
    if info["media"]:
        op["responses"] = {str(status): {"description": "Success", "content": {info["media"]: {}}},
                           "304": {"description": "Not modified: the If-None-Match ETag is current"}}
    if info["description"]:
        op["description"] = info["description"]
    if not getattr(handler, "public", False):
        op["security"] = [{"bearer": []}]
    parameters: list[dict[str, Any]] = [{"in": "path", "name": name, "required": True, "schema": {"type": "integer"}}
                                        for name in re.findall(r"{(\w+)}", path)]
    if info["query"] is not None:
        parameters.append({"in": "query", "schema": info["query"]})
    if info["idempotent"]:
        parameters.append(IDEMPOTENCY_KEY)
    if parameters:
        op["parameters"] = parameters
    if info["body"] is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": info["body"]}}}
    codes = set(info["errors"]) | ({422, 400} if info["body"] or info["query"] else set()) | (set() if getattr(handler, "public", False) else {401})
    if info["idempotent"]:
        codes |= {503}  # commit_unknown
    if info["body"] is not None:
        codes.add(413)  # server.max_body_size
    if info["database"]:
        codes.add(503)  # database_unavailable (web.error_middleware)
    if "{id}" in path:
        codes.add(404)  # an id that is not 1-19 ASCII digits matches no route
    for code in sorted(codes):
        op["responses"][str(code)] = {"description": ERROR_TEXT.get(code, "Error"), "content": {"application/json": {"schema": "Error"}}}
    for code, body, description in info["also"]:
        op["responses"][str(code)] = {"description": description, "content": {"application/json": {"schema": body}}}
    return op


@doc("This OpenAPI document", tag="meta", database=False)
@public
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_spec(request.app), dumps=dumps)
