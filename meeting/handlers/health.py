"""GET /healthz: what a load balancer or an operator asks first."""

import logging

from aiohttp import web

from .. import db, redis_client
from ..schemas import HealthSchema
from ..typedefs import config_key, engine_key, redis_key
from .common import doc, public, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
HEALTH_SCHEMA = HealthSchema()

log = logging.getLogger(__name__)


@doc("Liveness and dependencies; 503 when the database is unreachable", response=(200, HealthSchema), tag="meta")
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
    client = app[redis_key]
    if client is not None:
        try:
            await redis_client.ping(client, app[config_key].redis.socket_timeout * 2)
            result["redis"] = "ok"
        except Exception as exc:
            log.warning("health: redis check failed: %s", type(exc).__name__)
            result.update(status="degraded" if result["status"] == "ok" else result["status"], redis="unavailable")
    status = 503 if result["database"] != "ok" else 200
    return respond(HEALTH_SCHEMA, result, status=status)
