"""The web client: the page at `/` and its static files, from the package's `static/`
directory (package data, so a non-editable install serves them too), and the security
headers every response carries.

The files are read once, at start-up: a handful of small files, and a request for
one then costs no disk access. They are listed here, not globbed, so that the route
table (and the OpenAPI document) names exactly what is served.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from aiohttp import web

from .handlers.common import Handler, doc, public

#: The page's policy: its own origin only, no inline script or style, no frames, no
#: plugins. `connect-src 'self'` covers the same-origin WebSocket (CSP Level 3).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: Everything else (JSON) is never a document: nothing may load or frame it.
API_CSP = "default-src 'none'; frame-ancestors 'none'"

#: route path -> (file in meeting/static, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/meeting-client.js": ("meeting-client.js", "text/javascript; charset=utf-8"),
    "/static/meeting-session.js": ("meeting-session.js", "text/javascript; charset=utf-8"),
    "/static/meeting-protocol.js": ("meeting-protocol.js", "text/javascript; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def _handler(path: str, name: str, content_type: str) -> Handler:
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"Content-Type": content_type, "ETag": etag, "Cache-Control": "no-cache"}

    async def serve(request: web.Request) -> web.StreamResponse:
        if_none_match = request.headers.get("If-None-Match", "")
        if etag in if_none_match or if_none_match.strip() == "*":  # "*": any current version (RFC 9110)
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
        return web.Response(body=body, headers=headers)

    summary = "The web client page" if path == "/" else f"The web client's {name}"
    return doc(summary, tag="web", database=False, media=content_type.split(";")[0])(public(serve))


def routes() -> list[web.RouteDef]:
    return [web.get(path, _handler(path, name, content_type)) for path, (name, content_type) in FILES.items()]


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: no MIME sniffing (a JSON body is never run as script), no
    referrer leaks, no framing; the page's CSP on the page's files, `default-src 'none'`
    on everything else."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Content-Security-Policy", PAGE_CSP if request.path in FILES else API_CSP)

