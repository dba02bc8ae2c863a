"""The web client at `/` in a real browser: Debian's Chromium driven by Playwright, against
a real `python -m meeting` process (SQLite), through the DOM contract of docs/frontend.md.
The fixtures and the server are in tests/browser_support.py.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import pytest

from tests.browser_support import PASSWORD, WAIT, Server, Tab, browser, expect, log_in, server, shown, tabs  # noqa: F401


def test_register_log_out_and_log_in_with_the_keyboard(server: Server, tabs: Any) -> None:
    tab = tabs()
    name = f"reg{uuid.uuid4().hex[:8]}"
    log_in(tab, server, name, register=True)
    expect(tab.get("unread-count")).to_have_text("0")
    me = server.call("POST", "/auth/login", json={"username": name, "password": PASSWORD})["user"]
    hello = server.send(server.user("alice"), me, "welcome")
    expect(tab.message(hello["id"])).to_have_count(1)
    tab.get("logout").click()
    expect(tab.get("login-username")).to_be_visible()
    expect(tab.get("current-user")).to_be_hidden()
    # keyboard only: the username field has focus, Tab to the password, Enter submits
    expect(tab.get("login-username")).to_be_focused()
    tab.page.keyboard.press("Control+A")
    tab.page.keyboard.type(name)
    tab.page.keyboard.press("Tab")
    tab.page.keyboard.type(PASSWORD)
    tab.page.keyboard.press("Enter")
    expect(tab.get("current-user")).to_have_text(name, timeout=WAIT)
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected", timeout=WAIT)
    # logged in again in the same tab: the history is shown again, once
    expect(tab.page.get_by_test_id("message")).to_have_count(1)
    expect(tab.message(hello["id"])).to_have_attribute("data-read", "false")
    expect(tab.get("unread-count")).to_have_text("1")


def test_a_bad_password_shows_login_error(server: Server, tabs: Any) -> None:
    bob = server.user("bob")
    tab = tabs()
    tab.allowed.append(r"status of 401 \(Unauthorized\)")  # the refused POST /auth/login
    tab.page.goto(server.url + "/")
    expect(tab.get("login-error")).to_be_hidden()
    tab.get("login-username").fill(bob["username"])
    tab.get("login-password").fill("not the password")
    tab.get("login-submit").click()
    expect(tab.get("login-error")).to_be_visible()
    expect(tab.get("login-error")).to_have_text("Wrong username or password.")
    expect(tab.get("current-user")).to_be_hidden()


def test_a_message_sent_over_rest_appears_live_at_phone_width(server: Server, tabs: Any) -> None:
    alice, bob = server.user("alice", "爱丽丝 🌸"), server.user("bob")
    tab = tabs(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    log_in(tab, server, bob["username"])
    text = "你好，鲍勃！明天上午十点开会 🎉🍜 " + "很长的消息" * 30
    sent = server.send(alice, bob, text)
    item = tab.message(sent["id"])
    expect(item).to_have_count(1, timeout=WAIT)
    expect(item.get_by_test_id("message-content")).to_have_text(text)
    expect(item.get_by_test_id("message-sender")).to_have_text(alice["username"])
    expect(item).to_have_attribute("data-read", "false")
    expect(item).to_have_attribute("data-seq", "1")
    expect(item.get_by_test_id("mark-read")).to_be_visible()
    expect(tab.get("unread-count")).to_have_text("1")
    expect(tab.page.locator("[aria-live]")).to_contain_text(f"New message from {alice['username']}")
    # phone width: nothing wider than the screen, the message and compose form usable
    assert tab.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(tab.get("compose-send")).to_be_visible()
    box = item.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375
    _assert_fonts_cover(tab, item.get_by_test_id("message-content"))


def _assert_fonts_cover(tab: Tab, locator: Any) -> None:
    """Chinese text and emoji are drawn with fonts that have their glyphs (not a fallback's
    empty boxes): Chromium names the fonts it used for the node's text."""
    cdp = tab.page.context.new_cdp_session(tab.page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    handle = locator.element_handle()
    handle.evaluate("el => el.setAttribute('data-font-probe', '1')")
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "[data-font-probe]"})["nodeId"]
    fonts = {f["familyName"] for f in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]}
    cjk = {"WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Droid Sans Fallback"}
    if not fonts & cjk or "Noto Color Emoji" not in fonts:
        if os.environ.get("MEETING_REQUIRE_SERVICES") == "1":
            pytest.fail(f"no CJK or emoji font used ({sorted(fonts)}): install fonts-wqy-microhei fonts-noto-color-emoji")
        pytest.skip(f"fonts for CJK and emoji are not installed here (used: {sorted(fonts)})")


def test_two_pages_of_one_user_are_two_devices_and_share_reads(server: Server, tabs: Any) -> None:
    alice, bob = server.user("alice"), server.user("bob")
    first = tabs()
    second = tabs(first.page.context)  # a second tab: its own login, its own socket
    log_in(first, server, bob["username"])
    log_in(second, server, bob["username"])
    presence = server.call("GET", f"/users/{bob['id']}/presence", alice["token"])
    assert presence["online"] is True and presence["devices"] == 2
    one, two = server.send(alice, bob, "first"), server.send(alice, bob, "second")
    for tab in (first, second):
        for message in (one, two):
            expect(tab.message(message["id"])).to_have_count(1, timeout=WAIT)
        expect(tab.get("unread-count")).to_have_text("2")
    first.message(one["id"]).get_by_test_id("mark-read").click()
    for tab in (first, second):
        expect(tab.message(one["id"])).to_have_attribute("data-read", "true", timeout=WAIT)
        expect(tab.message(one["id"]).get_by_test_id("mark-read")).to_have_count(0)
        expect(tab.get("unread-count")).to_have_text("1", timeout=WAIT)
    second.get("mark-all-read").click()
    for tab in (first, second):
        expect(tab.get("unread-count")).to_have_text("0", timeout=WAIT)
        expect(tab.message(two["id"])).to_have_attribute("data-read", "true", timeout=WAIT)
    assert server.call("GET", "/messages/unread/count", bob["token"]) == {"count": 0}


def test_a_reload_keeps_the_session_and_shows_the_backlog_once(server: Server, tabs: Any) -> None:
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    before = [server.send(alice, bob, f"before {i}") for i in range(3)]
    expect(tab.message(before[-1]["id"])).to_have_count(1, timeout=WAIT)
    tab.requests.clear()
    tab.page.reload()
    expect(tab.get("current-user")).to_have_text(bob["username"], timeout=WAIT)
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected", timeout=WAIT)
    # away from the page (same tab, same session): what comes meanwhile is there on return
    tab.page.goto("about:blank")
    meanwhile = [server.send(alice, bob, f"meanwhile {i}") for i in range(2)]
    tab.page.goto(server.url + "/")
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected", timeout=WAIT)
    live = server.send(alice, bob, "after")
    expect(tab.message(live["id"])).to_have_count(1, timeout=WAIT)
    ids = tab.page.get_by_test_id("message").evaluate_all("els => els.map(e => Number(e.dataset.messageId))")
    assert ids == [m["id"] for m in reversed(before + meanwhile + [live])]  # newest first, each once
    seqs = tab.page.get_by_test_id("message").evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert seqs == [6, 5, 4, 3, 2, 1]
    expect(tab.get("unread-count")).to_have_text("6")
    assert not [r for r in tab.requests if "/auth/login" in r or "/auth/register" in r]
    # each load shows the newest page from REST, then resumes the stream from the since kept in
    # localStorage (not the newest it shows: the replay fills what a page leaves out)
    assert [s.url.rsplit("/", 1)[1] for s in tab.sockets] == ["messages", "messages?since=3", "messages?since=3"]


def test_more_than_a_page_while_away_is_all_shown_once_after_return(server: Server, tabs: Any) -> None:
    """60 messages while away, more than the 50 the page loads over REST: the stream resumes
    from the stored since (not the newest shown) and its replay fills the gap; a fresh device
    with no since gets them from the unread backlog."""
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    first = server.send(alice, bob, "first")
    expect(tab.message(first["id"])).to_have_count(1)
    tab.page.goto("about:blank")
    away = [server.send(alice, bob, f"away {i}") for i in range(60)]
    unread = server.call("GET", "/messages/unread?limit=100", bob["token"])["messages"]  # bob's seqs
    assert [m["id"] for m in unread] == [m["id"] for m in (first, *away)]
    expected = [(m["seq"], m["id"], "false") for m in reversed(unread)]
    tab.page.goto(server.url + "/")
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected")
    expect(tab.page.get_by_test_id("message")).to_have_count(61)
    expect(tab.get("unread-count")).to_have_text("61")
    assert shown(tab) == expected
    assert tab.sockets[-1].url.endswith("?since=1")
    other = tabs()  # another browser: no since stored, so the unread backlog fills it
    log_in(other, server, bob["username"])
    expect(other.page.get_by_test_id("message")).to_have_count(61)
    expect(other.get("unread-count")).to_have_text("61")
    assert shown(other) == expected
    assert other.sockets[-1].url.endswith("/ws/messages")


def test_a_server_restart_resumes_with_since_and_shows_what_came_meanwhile_once(server: Server, tabs: Any) -> None:
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    frames: list[list[dict[str, Any]]] = []

    def follow(ws: Any) -> None:
        seen: list[dict[str, Any]] = []
        frames.append(seen)
        ws.on("framereceived", lambda payload: seen.append(json.loads(payload)))

    tab.page.on("websocket", follow)
    # reconnecting while the server is down: the browser logs each refused attempt
    tab.allowed += [r"^WebSocket connection to '.*' failed: .*ERR_CONNECTION_REFUSED$",
                    r"^Failed to load resource: net::ERR_CONNECTION_REFUSED$"]
    log_in(tab, server, bob["username"])
    first = server.send(alice, bob, "before the restart")
    expect(tab.message(first["id"])).to_have_count(1, timeout=WAIT)

    server.stop()  # SIGTERM: the page's socket gets 1001 and starts reconnecting
    expect(tab.get("connection-status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT)
    # meanwhile: another process on the same database stores two messages for bob
    other = Server(server.workdir, db=server.db).start()
    try:
        meanwhile = [other.send(alice, bob, f"while you were away {i} 🌙") for i in range(2)]
    finally:
        other.stop()
    server.start()  # the same port, the same database
    for message in meanwhile:
        expect(tab.message(message["id"])).to_have_count(1, timeout=30_000)
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected", timeout=WAIT)
    live = server.send(alice, bob, "after the restart")
    expect(tab.message(live["id"])).to_have_count(1, timeout=WAIT)
    seqs = tab.page.get_by_test_id("message").evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert seqs == [4, 3, 2, 1]
    expect(tab.get("unread-count")).to_have_text("4")

    # the socket that got through resumed after seq 1 and was replayed exactly 2 and 3
    resumed = [s for s in tab.sockets if s.url.endswith("?since=1")]
    assert resumed and all(s.url.endswith("?since=1") for s in tab.sockets[1:])
    last = [(f["type"], f["payload"].get("seq")) for f in frames[-1] if f["type"] != "pong"]
    assert last == [("connected", None), ("message.new", 2), ("message.new", 3), ("message.synced", 3), ("message.new", 4)]


def test_the_page_works_without_console_errors(server: Server, tabs: Any) -> None:
    """A whole session, every feature: no console error (CSP violations, failed loads,
    exceptions) from start to end."""
    carol = server.user("carol")
    dave_name = f"dave{uuid.uuid4().hex[:8]}"
    tab = tabs()
    log_in(tab, server, dave_name, register=True)
    # compose to an unknown user: compose-error, nothing sent
    tab.get("compose-recipients").fill("nosuchuser0000")
    tab.get("compose-content").fill("hello?")
    tab.get("compose-send").click()
    expect(tab.get("compose-error")).to_contain_text("nosuchuser0000")
    # compose to carol, found by prefix (GET /users?q=) as one types, in Chinese with emoji
    tab.get("compose-recipients").fill(carol["username"][:7])
    expect(tab.page.locator(f'#user-suggestions option[value="{carol["username"]}"]')).to_have_count(1)
    tab.get("compose-recipients").fill(carol["username"])
    tab.get("compose-content").fill("卡罗尔你好 👋")
    tab.get("compose-send").click()
    expect(tab.get("compose-error")).to_be_hidden()
    expect(tab.page.locator("#sent-list")).to_contain_text("卡罗尔你好 👋", timeout=WAIT)
    received = server.call("GET", "/messages", carol["token"])["messages"]
    [message] = received
    assert message["content"] == "卡罗尔你好 👋"
    dave_id = message["sender_id"]
    assert server.call("GET", f"/users/{dave_id}", carol["token"])["username"] == dave_name
    # carol answers and invites dave to a meeting; both arrive live
    reply = server.call("POST", "/messages", carol["token"], expect=201, json={"recipient_ids": [dave_id], "content": "收到 ✅"})
    meeting = server.call("POST", "/meetings", carol["token"], expect=201, json={"title": "周会 📅", "participant_ids": [dave_id]})
    expect(tab.message(reply["id"])).to_have_count(1, timeout=WAIT)
    invite = tab.page.get_by_test_id("message").filter(has_text="周会")
    expect(invite).to_have_count(1, timeout=WAIT)
    expect(invite).to_contain_text("Meeting invitation")
    expect(tab.page.locator("#meeting-list")).to_contain_text(meeting["title"], timeout=WAIT)
    carol_presence = tab.page.locator(f'#people-list [data-user-id="{carol["id"]}"]')
    expect(carol_presence).to_contain_text(f"{carol['username']} offline", timeout=WAIT)  # carol has no socket open
    expect(tab.get("unread-count")).to_have_text("2")
    tab.message(reply["id"]).get_by_test_id("mark-read").click()
    expect(tab.get("unread-count")).to_have_text("1", timeout=WAIT)
    tab.get("mark-all-read").click()
    expect(tab.get("unread-count")).to_have_text("0", timeout=WAIT)
    # dave invites carol to a meeting of his own from the page
    tab.page.get_by_label("Title").fill("评审会 🚀")
    tab.page.get_by_label("Invite (usernames, comma-separated)").fill(carol["username"])
    tab.page.get_by_role("button", name="Create and invite").click()
    expect(tab.page.locator("#meeting-list")).to_contain_text("评审会 🚀", timeout=WAIT)
    invites = server.call("GET", "/messages", carol["token"])["messages"]
    assert [(m["type"], m["sender_id"]) for m in invites if m["type"] == "meeting.invite"] == [("meeting.invite", dave_id)]
    tab.get("logout").click()
    expect(tab.get("login-username")).to_be_visible()
    assert tab.console_errors == []  # and so does every test's teardown (tabs)


def test_sent_messages_show_their_read_receipts_live(server: Server, tabs: Any) -> None:
    alice, carol, bob = server.user("alice"), server.user("carol"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    tab.get("compose-recipients").fill(f"{alice['username']}, {carol['username']}")
    tab.get("compose-content").fill("明早九点见 ☕")
    tab.get("compose-send").click()
    item = tab.page.get_by_test_id("sent-message")
    expect(item).to_have_count(1)
    sent = {"id": int(item.get_attribute("data-message-id"))}
    assert [m["id"] for m in server.call("GET", "/messages", alice["token"])["messages"]] == [sent["id"]]
    expect(item.get_by_test_id("sent-receipts")).to_have_text("Read by 0 of 2")
    # alice reads it over REST: the page hears it as a message.receipt (push.receipt_window later)
    server.call("POST", f"/messages/{sent['id']}/read", alice["token"])
    expect(item.get_by_test_id("sent-receipts")).to_have_text("Read by 1 of 2", timeout=WAIT)
    expect(item).to_have_attribute("data-read-count", "1")
    item.get_by_text("Who read it").click()
    receipts = item.get_by_test_id("receipt")
    expect(receipts).to_have_count(2)
    expect(receipts.filter(has_text=alice["username"])).to_have_attribute("data-read", "true")
    expect(receipts.filter(has_text=carol["username"])).to_contain_text("not read yet")
    # bob sends from another device (REST): message.sent puts it in this page's sent box
    other = server.call("POST", "/messages", bob["token"], expect=201, json={"recipient_ids": [carol["id"]], "content": "from my phone 📱"})
    expect(tab.page.locator(f'[data-testid="sent-message"][data-message-id="{other["id"]}"]')).to_have_count(1, timeout=WAIT)
    expect(tab.page.get_by_test_id("sent-message")).to_have_count(2)
    assert tab.console_errors == []


def test_who_read_it_asks_for_a_hundred_people_a_few_at_a_time(server: Server, tabs: Any) -> None:
    """A notice to 12 people: the page names them (sent box, then "Who read it") with GET
    /users/{id}, each id once, never more than 4 in flight (it used to send them all at once)."""
    people = [server.user("p") for _ in range(12)]
    bob = server.user("bob")
    notice = server.call("POST", "/messages", bob["token"], expect=201,
                         json={"recipient_ids": [p["id"] for p in people], "content": "all hands"})
    server.call("POST", f"/messages/{notice['id']}/read", people[0]["token"])
    tab = tabs()
    in_flight, most, asked = 0, 0, []

    def started(request: Any) -> None:
        nonlocal in_flight, most
        if re.search(r"/users/\d+$", request.url):
            in_flight += 1
            most = max(most, in_flight)
            asked.append(int(request.url.rsplit("/", 1)[1]))

    def ended(request: Any) -> None:
        nonlocal in_flight
        if re.search(r"/users/\d+$", request.url):
            in_flight -= 1

    tab.page.on("request", started)
    tab.page.on("requestfinished", ended)
    tab.page.on("requestfailed", ended)
    log_in(tab, server, bob["username"])
    item = tab.page.locator(f'[data-testid="sent-message"][data-message-id="{notice["id"]}"]')
    expect(item.get_by_test_id("sent-receipts")).to_have_text("Read by 1 of 12", timeout=WAIT)
    item.get_by_text("Who read it").click()
    expect(item.get_by_test_id("receipt")).to_have_count(12)
    expect(item.get_by_test_id("receipt").filter(has_text=people[0]["username"])).to_have_attribute("data-read", "true")
    expect(item).to_contain_text(people[-1]["username"])
    assert sorted(asked) == sorted(p["id"] for p in people)  # each once: the cache
    assert 1 <= most <= 4, most


def test_what_was_sent_from_another_device_while_disconnected_is_in_order(server: Server, tabs: Any) -> None:
    """message.sent is live only: after a reconnect the page reads the sent box again, and
    what another device sent meanwhile goes where it belongs (newest first), not at the end."""
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    tab.allowed += [r"^WebSocket connection to '.*' failed: .*ERR_CONNECTION_REFUSED$",
                    r"^Failed to load resource: net::ERR_CONNECTION_REFUSED$"]
    log_in(tab, server, bob["username"])
    first = server.call("POST", "/messages", bob["token"], expect=201, json={"recipient_ids": [alice["id"]], "content": "first"})
    sent = tab.page.get_by_test_id("sent-message")
    expect(sent).to_have_count(1)
    server.stop()
    expect(tab.get("connection-status")).to_have_attribute("data-state", "reconnecting")
    other = Server(server.workdir, db=server.db).start()  # another process, the same database
    try:
        meanwhile = [other.call("POST", "/messages", bob["token"], expect=201,
                                json={"recipient_ids": [alice["id"]], "content": f"meanwhile {i}"}) for i in range(2)]
    finally:
        other.stop()
    server.start()
    expect(sent).to_have_count(3, timeout=30_000)
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected")
    ids = sent.evaluate_all("els => els.map(e => Number(e.dataset.messageId))")
    assert ids == [meanwhile[1]["id"], meanwhile[0]["id"], first["id"]]
