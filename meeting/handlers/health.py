"""GET /healthz: what a load balancer or an operator asks first."""

import logging

from aiohttp import web

from .. import db, redis_client
from ..schemas import HealthSchema
from ..typedefs import config_key, engine_key, push_hub_key, redis_breaker_key, redis_key, rooms_key
from .common import doc, public, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
HEALTH_SCHEMA = HealthSchema()

log = logging.getLogger(__name__)


@doc("Liveness and dependencies; 503 when the database is unreachable", response=(200, HealthSchema),
     also=((503, HealthSchema, "The database is unreachable"),), tag="meta")
@public
async def healthz(request: web.Request) -> web.Response:
    app = request.app
    timeout = app[config_key].database.connect_timeout
    result = {"status": "ok", "database": "ok", "redis": "disabled"}
    try:
        await db.ping(app[engine_key], timeout)
    except Exception as exc:  # any failure means "not ok"; the reason goes to the log only
        log.warning("health: database check failed: %s", type(exc).__name__)
        result.update(status="unavailable", database="unavailable")
    if app[redis_key] is not None:
        result["redis"] = "ok" if await _redis_ok(app) else "unavailable"
        if result["redis"] != "ok" and result["status"] == "ok":
            result["status"] = "degraded"  # sends and local push work; other instances catch up later
    status = 503 if result["database"] != "ok" else 200
    return respond(HEALTH_SCHEMA, result, status=status)


async def _redis_ok(app: web.Application) -> bool:
    """Redis is usable by this instance: the breaker is closed (no ping while it is open:
    the answer must come at once), the push and room brokers' readers are subscribed (without
    the room broker's, rooms stop spanning instances), and a PING answers."""
    if app[redis_breaker_key].open:
        return False
    for name, holder in (("push", app.get(push_hub_key)), ("room", app.get(rooms_key))):
        if holder is not None and not getattr(holder.broker, "healthy", True):
            log.warning("health: the %s broker is not connected to redis", name)
            return False
    try:
        await redis_client.ping(app[redis_key], app[config_key].redis.socket_timeout * 2)  # type: ignore[arg-type]
    except Exception as exc:
        log.warning("health: redis check failed: %s", type(exc).__name__)
        return False
    return True
