"""GET /users/me, /users/{id} and the recipient finder /users?q=."""

from aiohttp import web

from ..schemas import UserListSchema, UserSchema, UserSearchQuery
from ..typedefs import user_id_key, user_service_key
from .common import parse_query, path_id, respond


async def me(request: web.Request) -> web.Response:
    return respond(UserSchema(), await request.app[user_service_key].get(request[user_id_key]))


async def get_user(request: web.Request) -> web.Response:
    return respond(UserSchema(), await request.app[user_service_key].get(path_id(request)))


async def search(request: web.Request) -> web.Response:
    query = parse_query(request, UserSearchQuery())
    return respond(UserListSchema(), await request.app[user_service_key].search(query["q"], query["limit"], query["after"]))
