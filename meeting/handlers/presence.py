"""Presence: is a user online, on how many devices, and when were they last seen."""

from aiohttp import web

from ..schemas import PresenceManySchema, PresenceQuery, PresenceSchema
from ..typedefs import presence_key, user_service_key
from .common import doc, parse_query, path_id, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
PRESENCE_MANY_SCHEMA = PresenceManySchema()
PRESENCE_QUERY = PresenceQuery()
PRESENCE_SCHEMA = PresenceSchema()


@doc("Presence of one user", response=(200, PresenceSchema), errors=(404,), tag="push")
async def one(request: web.Request) -> web.Response:
    user_id = path_id(request)
    await request.app[user_service_key].get(user_id)  # 404 for an unknown user
    status = await request.app[presence_key].status([user_id])
    return respond(PRESENCE_SCHEMA, status[user_id])


@doc("Presence of up to 100 users: ?ids=1,2,3", query=PresenceQuery, response=(200, PresenceManySchema), tag="push")
async def many(request: web.Request) -> web.Response:
    query = parse_query(request, PRESENCE_QUERY)
    ids = sorted({int(i) for i in query["ids"].split(",")})
    status = await request.app[presence_key].status(ids)
    return respond(PRESENCE_MANY_SCHEMA, {"users": {str(k): v for k, v in status.items()}})
