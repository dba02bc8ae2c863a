"""The HTTP contract every route shares: JSON errors, body limits, health."""

from typing import Any

from aiohttp import web

from meeting.config import Config, with_overrides
from meeting.handlers.common import public
from meeting.typedefs import engine_key
from meeting.web import create_app
from tests.conftest import base_config
from tests.helpers import Api


async def test_unknown_route_is_json_404(api: Api) -> None:
    body = await api.call("GET", "/no/such/route", expect=404)
    assert body == {"error": {"code": "not_found", "message": "Not Found"}}


async def test_wrong_method_is_json_405_with_allow(api: Api) -> None:
    resp = await api.client.delete("/auth/login")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_malformed_json_and_wrong_content_type_are_400(api: Api) -> None:
    bad = await api.call("POST", "/auth/login", data="{nope", headers={"Content-Type": "application/json"}, expect=400)
    assert bad["error"]["code"] == "invalid_json"
    empty = await api.call("POST", "/auth/login", data="", headers={"Content-Type": "application/json"}, expect=400)
    assert empty["error"]["code"] == "invalid_json"
    form = await api.call("POST", "/auth/login", data={"username": "x"}, expect=400)
    assert form["error"]["code"] == "unsupported_content_type"


async def test_non_object_json_is_422(api: Api) -> None:
    body = await api.call("POST", "/auth/login", json=[1, 2], expect=422)
    assert body["error"]["code"] == "validation_error"


async def test_body_over_limit_is_413(make_client: Any, config: Config) -> None:
    client = await make_client(with_overrides(config, server={"max_body_size": 2048}))
    resp = await client.post("/auth/register", data="x" * 5000, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_unexpected_error_is_generic_500_without_traceback(make_client: Any, config: Config, caplog: Any) -> None:
    @public
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    app = create_app(config)
    app.router.add_get("/boom", boom)
    client = await make_client(app)
    resp = await client.get("/boom")
    assert resp.status == 500
    text = await resp.text()
    assert "secret internals" not in text and "Traceback" not in text
    assert (await resp.json())["error"]["code"] == "internal_error"
    assert "secret internals" in caplog.text


async def test_healthz_reports_database_and_redis_off(api: Api) -> None:
    body = await api.call("GET", "/healthz", expect=200)
    assert body == {"status": "ok", "database": "ok", "redis": "disabled"}


async def test_healthz_with_redis(make_client: Any, config: Config, redis_url: str) -> None:
    client = await make_client(with_overrides(config, redis={"url": redis_url}))
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["redis"] == "ok"


async def test_healthz_with_redis_down_is_degraded_not_failed(make_client: Any, config: Config) -> None:
    cfg = with_overrides(config, redis={"url": "redis://127.0.0.1:1/0", "socket_timeout": 0.2})
    client = await make_client(cfg)
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "degraded", "database": "ok", "redis": "unavailable"}


async def test_healthz_is_503_naming_the_database_when_unreachable(make_client: Any) -> None:
    cfg = base_config(database={"url": "mysql+aiomysql://root@127.0.0.1:1/none", "auto_migrate": False, "connect_timeout": 1.0})
    client = await make_client(cfg)
    resp = await client.get("/healthz")
    assert resp.status == 503
    assert (await resp.json())["database"] == "unavailable"


async def test_access_log_has_method_path_status_and_no_query(api: Api, caplog: Any) -> None:
    caplog.set_level("INFO", logger="aiohttp.access")
    await api.client.get("/healthz?token=sekrit")
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(line.startswith("GET /healthz 200 ") and line.endswith("ms") for line in lines), lines
    assert "sekrit" not in caplog.text



async def test_a_database_that_is_down_answers_503_not_500(make_client: Any) -> None:
    cfg = base_config(database={"url": "mysql+aiomysql://root@127.0.0.1:1/nope", "connect_timeout": 0.5, "auto_migrate": False})
    api = Api(await make_client(cfg))
    resp = await api.client.post("/auth/register", json={"username": "dbdown", "password": "correct horse"})
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "database_unavailable" and resp.headers["Retry-After"] == "1"
    assert api.client.app[engine_key].sync_engine.hide_parameters  # a logged statement error carries no values
