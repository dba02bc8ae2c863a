"""POST /auth/register and /auth/login."""

from aiohttp import web

from ..schemas import LoginResponseSchema, LoginSchema, LogoutAllSchema, RefreshSchema, RegisterSchema, TokensSchema, UserSchema
from ..typedefs import auth_service_key, session_id_key, user_id_key
from .common import client_address, doc, limit, parse_body, public, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
LOGIN_RESPONSE_SCHEMA = LoginResponseSchema()
LOGIN_SCHEMA = LoginSchema()
REGISTER_SCHEMA = RegisterSchema()
REFRESH_SCHEMA = RefreshSchema()
TOKENS_SCHEMA = TokensSchema()
LOGOUT_ALL_SCHEMA = LogoutAllSchema()
USER_SCHEMA = UserSchema()


@doc("Create an account", body=RegisterSchema, response=(201, UserSchema), errors=(409, 429, 503), tag="auth")
@public
async def register(request: web.Request) -> web.Response:
    await limit(request, "registrations_per_address", client_address(request))
    body = await parse_body(request, REGISTER_SCHEMA)
    user = await request.app[auth_service_key].register(**body)
    return respond(USER_SCHEMA, user, status=201)


@doc("Log in and get a bearer token", body=LoginSchema, response=(200, LoginResponseSchema), errors=(401, 429, 503), tag="auth")
@public
async def login(request: web.Request) -> web.Response:
    await limit(request, "logins_per_address", client_address(request))
    body = await parse_body(request, LOGIN_SCHEMA)
    return respond(LOGIN_RESPONSE_SCHEMA, await request.app[auth_service_key].login(**body))


@doc("Spend a refresh token for a new access token and a new refresh token (same session)", body=RefreshSchema,
     response=(200, TokensSchema), errors=(401, 429), tag="auth")
@public  # the refresh token is the credential: the access token may have expired
async def refresh(request: web.Request) -> web.Response:
    await limit(request, "logins_per_address", client_address(request))
    body = await parse_body(request, REFRESH_SCHEMA)
    return respond(TOKENS_SCHEMA, await request.app[auth_service_key].refresh(body["refresh_token"]))


@doc("End this session: its access and refresh tokens stop working, its WebSockets close with 4001",
     response=(204, None), tag="auth")
async def logout(request: web.Request) -> web.Response:
    await request.app[auth_service_key].logout(request[user_id_key], request[session_id_key])
    return web.Response(status=204)


@doc("End every session of the caller (every device)", response=(200, LogoutAllSchema), tag="auth")
async def logout_all(request: web.Request) -> web.Response:
    ended = await request.app[auth_service_key].logout_all(request[user_id_key])
    return respond(LOGOUT_ALL_SCHEMA, {"sessions": ended})
