"""The meetings REST API."""

from aiohttp import web

from ..schemas import CreateMeetingSchema, MeetingPageSchema, MeetingSchema, PageQuery
from ..typedefs import meeting_service_key, user_id_key
from .common import parse_body, parse_query, path_id, respond


async def create(request: web.Request) -> web.Response:
    body = await parse_body(request, CreateMeetingSchema())
    meeting = await request.app[meeting_service_key].create(request[user_id_key], **body)
    return respond(MeetingSchema(), meeting, status=201)


async def list_mine(request: web.Request) -> web.Response:
    query = parse_query(request, PageQuery())
    return respond(MeetingPageSchema(), await request.app[meeting_service_key].list_for(request[user_id_key], **query))


async def get_one(request: web.Request) -> web.Response:
    return respond(MeetingSchema(), await request.app[meeting_service_key].get(request[user_id_key], path_id(request)))
