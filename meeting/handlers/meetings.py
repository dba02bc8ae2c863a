"""The meetings REST API."""

from aiohttp import web

from ..schemas import CreateMeetingSchema, MeetingPageSchema, MeetingSchema, PageQuery
from ..typedefs import meeting_service_key, user_id_key
from .common import doc, limit, parse_query, path_id, respond
from .idempotency import keyed_body, respond_keyed

# Built once: schemas are stateless, and constructing one costs more than using it.
CREATE_MEETING_SCHEMA = CreateMeetingSchema()
MEETING_PAGE_SCHEMA = MeetingPageSchema()
MEETING_SCHEMA = MeetingSchema()
PAGE_QUERY = PageQuery()


@doc("Create a meeting; every other participant gets a meeting.invite message", body=CreateMeetingSchema, response=(201, MeetingSchema),
     errors=(409, 429, 503), tag="meetings", idempotent=True)
async def create(request: web.Request) -> web.Response:
    await limit(request, "sends_per_user", request[user_id_key])  # it sends the invitations
    body, once = await keyed_body(request, CREATE_MEETING_SCHEMA, MEETING_SCHEMA, 201)
    result = await request.app[meeting_service_key].create(request[user_id_key], **body, once=once)
    return respond_keyed(MEETING_SCHEMA, result, 201)


@doc("Meetings the caller takes part in, newest first", query=PageQuery, response=(200, MeetingPageSchema), tag="meetings")
async def list_mine(request: web.Request) -> web.Response:
    query = parse_query(request, PAGE_QUERY)
    return respond(MEETING_PAGE_SCHEMA, await request.app[meeting_service_key].list_for(request[user_id_key], **query))


@doc("A meeting (participants only)", response=(200, MeetingSchema), errors=(404,), tag="meetings")
async def get_one(request: web.Request) -> web.Response:
    return respond(MEETING_SCHEMA, await request.app[meeting_service_key].get(request[user_id_key], path_id(request)))
