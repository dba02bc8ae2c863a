"""GET /users/me, /users/{id} and the recipient finder /users?q=."""

from aiohttp import web

from ..schemas import UserListSchema, UserSchema, UserSearchQuery
from ..typedefs import user_id_key, user_service_key
from .common import doc, parse_query, path_id, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
USER_LIST_SCHEMA = UserListSchema()
USER_SCHEMA = UserSchema()
USER_SEARCH_QUERY = UserSearchQuery()


@doc("The authenticated user", response=(200, UserSchema), tag="users")
async def me(request: web.Request) -> web.Response:
    return respond(USER_SCHEMA, await request.app[user_service_key].get(request[user_id_key]))


@doc("A user by id", response=(200, UserSchema), errors=(404,), tag="users")
async def get_user(request: web.Request) -> web.Response:
    return respond(USER_SCHEMA, await request.app[user_service_key].get(path_id(request)))


@doc("Find users by username prefix (keyset pages on username)", query=UserSearchQuery, response=(200, UserListSchema), tag="users")
async def search(request: web.Request) -> web.Response:
    query = parse_query(request, USER_SEARCH_QUERY)
    return respond(USER_LIST_SCHEMA, await request.app[user_service_key].search(query["q"], query["limit"], query["after"]))
