from openapi_spec_validator import validate

from meeting.frontend import FILES
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
    unread = spec["paths"]["/messages/unread"]["get"]
    assert {p["name"] for p in unread["parameters"]} == {"limit", "after_seq"}
    ref = unread["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    page = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(page["properties"]) == {"messages", "count", "next_after_seq"}


async def test_both_creating_posts_document_the_idempotency_key_header(api: Api) -> None:
    spec = await api.call("GET", "/openapi.json", expect=200)
    for path in ("/messages", "/meetings"):
        op = spec["paths"][path]["post"]
        [header] = [p for p in op["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key" and header["required"] is False and header["schema"]["type"] == "string"
        assert {"400", "409", "422", "503"} <= set(op["responses"])  # 409: idempotency_key_in_use
    assert not any(p["in"] == "header" for p in spec["paths"]["/messages/read"]["post"].get("parameters", []))


async def test_the_document_declares_every_status_a_route_can_answer(api: Api) -> None:
    """What schemathesis (tests/test_fuzz_api.py) found undeclared: a GET without the upgrade
    on a WebSocket route (400), an id that is not 1-19 ASCII digits (404), a body past
    server.max_body_size (413), a busy database or hashing pool (503) and healthz's 503."""
    paths = (await api.call("GET", "/openapi.json", expect=200))["paths"]
    for ws in ("/ws/messages", "/ws/meetings/{id}"):
        assert "400" in paths[ws]["get"]["responses"]
    assert "404" in paths["/ws/meetings/{id}"]["get"]["responses"]
    for path, method in (("/auth/register", "post"), ("/auth/login", "post"), ("/messages", "post"), ("/meetings", "post")):
        assert {"413", "503"} <= set(paths[path][method]["responses"]), path
    assert paths["/healthz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Health")
    # any route that reads the database answers 503 database_unavailable while it is down
    assert {path for path, ops in paths.items() if "503" not in ops.get("get", ops.get("post", {}))["responses"]} == \
        {"/openapi.json", "/metrics", *FILES}  # FILES: the web client's page and files (meeting.frontend)
    assert "403" in paths["/metrics"]["get"]["responses"]  # metrics.allow


async def test_both_views_of_a_message_are_separate_schemas(api: Api) -> None:
    spec = await api.call("GET", "/openapi.json", expect=200)
    schemas = spec["components"]["schemas"]
    sent, received = schemas["SentMessage"], schemas["ReceivedMessage"]
    assert {"recipient_ids", "recipient_count", "read_count"} <= set(sent["required"])
    assert "recipient_ids" not in received["properties"] and {"recipient_count", "read_at", "seq"} <= set(received["required"])
    assert schemas["SentPage"]["properties"]["messages"]["items"]["$ref"].endswith("/SentMessage")
    for page in ("ReceivedPage", "Unread"):
        assert schemas[page]["properties"]["messages"]["items"]["$ref"].endswith("/ReceivedMessage")
    post = spec["paths"]["/messages"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert post["$ref"].endswith("/SentMessage")
    inbox = spec["paths"]["/messages"]["get"]
    assert {p["name"]: p for p in inbox["parameters"]}["box"]["schema"]["enum"] == ["inbox", "sent"]
    assert [s["$ref"].rsplit("/", 1)[1] for s in inbox["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]] \
        == ["ReceivedPage", "SentPage"]
    receipts = spec["paths"]["/messages/{id}/receipts"]["get"]
    assert {p["name"] for p in receipts["parameters"]} == {"id", "limit", "after", "unread"} and "404" in receipts["responses"]
    assert set(schemas["Receipts"]["required"]) == {"message_id", "recipient_count", "read_count", "recipients", "next_after"}
