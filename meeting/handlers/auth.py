"""POST /auth/register and /auth/login."""

from aiohttp import web

from ..schemas import LoginResponseSchema, LoginSchema, RegisterSchema, UserSchema
from ..typedefs import auth_service_key
from .common import client_address, doc, limit, parse_body, public, respond

# Built once: schemas are stateless, and constructing one costs more than using it.
LOGIN_RESPONSE_SCHEMA = LoginResponseSchema()
LOGIN_SCHEMA = LoginSchema()
REGISTER_SCHEMA = RegisterSchema()
USER_SCHEMA = UserSchema()


@doc("Create an account", body=RegisterSchema, response=(201, UserSchema), errors=(409, 429), tag="auth")
@public
async def register(request: web.Request) -> web.Response:
    await limit(request, "registrations_per_address", client_address(request))
    body = await parse_body(request, REGISTER_SCHEMA)
    user = await request.app[auth_service_key].register(**body)
    return respond(USER_SCHEMA, user, status=201)


@doc("Log in and get a bearer token", body=LoginSchema, response=(200, LoginResponseSchema), errors=(401, 429), tag="auth")
@public
async def login(request: web.Request) -> web.Response:
    await limit(request, "logins_per_address", client_address(request))
    body = await parse_body(request, LOGIN_SCHEMA)
    return respond(LOGIN_RESPONSE_SCHEMA, await request.app[auth_service_key].login(**body))
