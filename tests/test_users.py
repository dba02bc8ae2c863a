from tests.helpers import Api


async def test_get_user_by_id_and_404(api: Api) -> None:
    alice, bob = await api.users(2)
    body = await api.call("GET", f"/users/{bob.id}", user=alice, expect=200)
    assert body["id"] == bob.id and body["username"] == bob.username and "password_hash" not in body
    missing = await api.call("GET", "/users/999999", user=alice, expect=404)
    assert missing["error"]["code"] == "not_found"
    huge = await api.call("GET", "/users/99999999999999999999999", user=alice, expect=404)
    assert huge["error"]["code"] == "not_found"


async def test_search_by_prefix_with_keyset_pages(api: Api) -> None:
    for name in ["ann", "anna", "annabel", "anne", "bob", "anx"]:
        await api.user(name)
    viewer = await api.user("viewer")
    first = await api.call("GET", "/users", user=viewer, params={"q": "Ann", "limit": "2"}, expect=200)
    assert [u["username"] for u in first["users"]] == ["ann", "anna"]
    assert first["next_after"] == "anna"
    second = await api.call("GET", "/users", user=viewer, params={"q": "ann", "limit": "2", "after": first["next_after"]}, expect=200)
    assert [u["username"] for u in second["users"]] == ["annabel", "anne"]
    assert second["next_after"] is None


async def test_search_treats_underscore_literally(api: Api) -> None:
    for name in ["an_x", "anxx"]:
        await api.user(name)
    viewer = await api.user("viewer")
    found = await api.call("GET", "/users", user=viewer, params={"q": "an_"}, expect=200)
    assert [u["username"] for u in found["users"]] == ["an_x"]


async def test_search_rejects_bad_limits(api: Api) -> None:
    viewer = await api.user("viewer")
    for limit in ["0", "101", "x"]:
        body = await api.call("GET", "/users", user=viewer, params={"limit": limit}, expect=422)
        assert "limit" in body["error"]["details"]


async def test_chinese_and_emoji_round_trip(api: Api) -> None:
    name = "会议助手 🎉👩‍💻"
    created = await api.call("POST", "/auth/register", json={"username": "zhang", "password": "password123", "display_name": name}, expect=201)
    viewer = await api.user("viewer")
    fetched = await api.call("GET", f"/users/{created['id']}", user=viewer, expect=200)
    assert fetched["display_name"] == name
