from openapi_spec_validator import validate

from tests.helpers import Api


async def test_every_route_is_documented_in_a_valid_openapi_document(api: Api) -> None:
    spec = await api.call("GET", "/openapi.json", expect=200)
    validate(spec)
    routes = {(r.method.lower(), r.resource.canonical) for r in api.client.app.router.routes() if r.method != "HEAD"}
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes - documented == set()
    assert documented - routes == set()
    send = spec["paths"]["/messages"]["post"]
    assert send["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SendMessage")
    assert send["security"] == [{"bearer": []}] and "422" in send["responses"]
    assert "security" not in spec["paths"]["/auth/login"]["post"]
