"""The web client in a real browser when things go wrong or race: a duplicated tab, a
history that fails, too many connections, a read or a mark-all-read that crosses a message
in flight, tokens that expire every 3 seconds. Fixtures: tests/browser_support.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.browser_support import PASSWORD, WAIT, Server, Tab, browser, expect, log_in, server, shown, tabs  # noqa: F401


def test_a_duplicated_tab_logs_in_afresh_instead_of_sharing_the_session(server: Server, tabs: Any) -> None:
    """window.open (like "Duplicate tab") copies sessionStorage, tokens included. The copy
    finds the session's Web Lock held by the live tab, gives the tokens up and asks for a login
    of its own; the first tab goes on (its refresh token was never presented twice)."""
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    with tab.page.context.expect_page() as opened:
        tab.page.evaluate("window.open('/')")
    copy = Tab(opened.value)
    assert copy.page.evaluate("sessionStorage.getItem('meeting.session') !== null")  # the copied tokens
    expect(copy.get("login-error")).to_contain_text("open in another tab")
    expect(copy.get("login-username")).to_be_visible()
    assert copy.page.evaluate("sessionStorage.getItem('meeting.session')") is None
    copy.get("login-username").fill(bob["username"])
    copy.get("login-password").fill(PASSWORD)
    copy.get("login-submit").click()
    expect(copy.get("connection-status")).to_have_attribute("data-state", "connected")
    sent = server.send(alice, bob, "to both tabs")
    for t in (tab, copy):
        expect(t.message(sent["id"])).to_have_count(1)
        expect(t.get("connection-status")).to_have_attribute("data-state", "connected")
    # two sessions now: each tab rotates a refresh token of its own
    tokens = {json.loads(t.page.evaluate("sessionStorage.getItem('meeting.session')"))["refreshToken"] for t in (tab, copy)}
    assert len(tokens) == 2
    tab.page.reload()
    expect(tab.get("current-user")).to_have_text(bob["username"])  # a reload is not a copy
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected")
    copy.page.close()
    assert copy.page_errors == [] and copy.unexpected_console_errors() == []


def test_mark_all_read_leaves_a_message_that_came_after_it_unread(server: Server, tabs: Any) -> None:
    """The answer to POST /messages/read {all} is held back until a message sent after the
    server's commit is on the page: that message stays unread (the page marks what the
    message.read frame names, not everything it shows when the answer comes)."""
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    before = server.send(alice, bob, "before")
    expect(tab.message(before["id"])).to_have_count(1)
    held: list[Any] = []
    tab.page.route(lambda url: url.endswith("/messages/read"), lambda route: held.append((route, route.fetch())), times=1)
    tab.get("mark-all-read").click()
    expect(tab.message(before["id"])).to_have_attribute("data-read", "true")  # message.read, over the socket
    expect(tab.get("unread-count")).to_have_text("0")
    late = server.send(alice, bob, "after the commit")
    expect(tab.message(late["id"])).to_have_count(1)
    expect(tab.get("unread-count")).to_have_text("1")
    [(route, answer)] = held
    route.fulfill(response=answer)
    expect(tab.get("mark-all-read")).to_be_enabled()  # the answer was handled
    expect(tab.message(late["id"])).to_have_attribute("data-read", "false")
    expect(tab.get("unread-count")).to_have_text("1")
    assert server.call("GET", "/messages/unread/count", bob["token"]) == {"count": 1}


def test_a_read_that_comes_while_the_sender_is_looked_up_is_not_lost(server: Server, tabs: Any) -> None:
    """GET /users/{sender} is held while the message is read on another device: the page
    shows the message at once, applies the message.read, then names the sender."""
    alice, bob = server.user("alice"), server.user("bob")
    tab = tabs()
    log_in(tab, server, bob["username"])
    held: list[Any] = []
    tab.page.route(lambda url: url.endswith(f"/users/{alice['id']}"), lambda route: held.append(route), times=1)
    sent = server.send(alice, bob, "read elsewhere")
    item = tab.message(sent["id"])
    expect(item).to_have_attribute("data-read", "false")
    server.call("POST", f"/messages/{sent['id']}/read", bob["token"])
    expect(item).to_have_attribute("data-read", "true")
    expect(tab.get("unread-count")).to_have_text("0")
    [route] = held
    route.continue_()
    expect(item.get_by_test_id("message-sender")).to_have_text(alice["username"])
    expect(item).to_have_attribute("data-read", "true")


def test_a_failed_history_right_after_login_still_gives_a_live_page(server: Server, tabs: Any) -> None:
    """GET /messages answers 503 right after login: the page says so in the banner, opens the
    stream anyway (its backlog shows the unread message), and loads the history once synced."""
    alice, bob = server.user("alice"), server.user("bob")
    was_read = server.send(alice, bob, "read before")
    server.call("POST", f"/messages/{was_read['id']}/read", bob["token"])
    unread = server.send(alice, bob, "unread")
    tab = tabs()
    tab.allowed.append(r"status of 503 \(Service Unavailable\)")
    tab.page.route(lambda url: url.endswith("/messages?limit=50"), lambda route: route.fulfill(
        status=503, json={"error": {"code": "database_unavailable", "message": "The database is unavailable."}}), times=1)
    log_in(tab, server, bob["username"])
    expect(tab.get("error-banner")).to_contain_text("The database is unavailable.")
    expect(tab.get("reconnect")).to_be_hidden()
    expect(tab.message(unread["id"])).to_have_attribute("data-read", "false")
    expect(tab.message(was_read["id"])).to_have_attribute("data-read", "true")  # the history, retried
    expect(tab.get("unread-count")).to_have_text("1")
    later = server.send(alice, bob, "live")
    expect(tab.message(later["id"])).to_have_count(1)
    assert [seq for seq, _, _ in shown(tab)] == [3, 2, 1]


def test_too_many_connections_shows_the_error_banner_and_reconnect_works(tmp_path: Path, tabs: Any) -> None:
    """One socket per user allowed: a second device is refused with 4029, stops (no retry
    loop), and says so in the visible banner; once the first device leaves, Reconnect works."""
    server = Server(tmp_path, MEETING_PUSH_MAX_CONNECTIONS_PER_USER="1").start()
    first, second = tabs(), tabs()
    try:
        alice, bob = server.user("alice"), server.user("bob")
        log_in(first, server, bob["username"])
        expect(first.get("error-banner")).to_be_hidden()
        second.page.goto(server.url + "/")
        second.get("login-username").fill(bob["username"])
        second.get("login-password").fill(PASSWORD)
        second.get("login-submit").click()
        banner = second.get("error-banner")
        expect(banner).to_be_visible()
        expect(banner).to_have_attribute("role", "alert")
        expect(banner).to_contain_text("Too many open connections")
        expect(second.get("connection-status")).to_have_attribute("data-state", "offline")
        expect(second.get("reconnect")).to_be_visible()
        assert [s.url.rsplit("/", 1)[1] for s in second.sockets] == ["messages"]  # stopped: no retries
        first.get("logout").click()
        expect(first.get("login-username")).to_be_visible()
        second.get("reconnect").click()
        expect(second.get("connection-status")).to_have_attribute("data-state", "connected")
        expect(banner).to_be_hidden()
        sent = server.send(alice, bob, "now you are in")
        expect(second.message(sent["id"])).to_have_count(1)
    finally:
        for tab in (first, second):
            tab.page.close()
        server.stop()


@pytest.mark.parametrize("notice", ["1.5", "0"], ids=["token.expiring", "close-4001"])
def test_short_lived_tokens_are_refreshed_without_a_new_login(tmp_path: Path, tabs: Any, notice: str) -> None:
    """Access tokens that live 3 s. With a notice, the page answers each `token.expiring`
    with a `refresh` frame (one socket all along); without one, the server closes with 4001
    at expiry and the page refreshes, then reconnects with since. Either way: no new login,
    rotating refresh tokens, every message once."""
    server = Server(tmp_path, MEETING_AUTH_TOKEN_TTL="3", MEETING_PUSH_TOKEN_EXPIRY_NOTICE=notice).start()
    tab = tabs()
    try:
        alice, bob = server.user("alice"), server.user("bob")
        sent: list[dict[str, Any]] = []
        tab.page.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(json.loads(p))))
        log_in(tab, server, bob["username"])
        first = server.send(alice, bob, "one")
        expect(tab.message(first["id"])).to_have_count(1)
        tab.requests.clear()
        for _ in range(2):  # two more token lifetimes
            tab.page.wait_for_event("request", predicate=lambda r: r.url.endswith("/auth/refresh"), timeout=WAIT)
        second = server.send(server.user("carol"), bob, "two")  # alice's own token expired by now
        expect(tab.message(second["id"])).to_have_count(1)
        expect(tab.get("connection-status")).to_have_attribute("data-state", "connected")
        seqs = tab.page.get_by_test_id("message").evaluate_all("els => els.map(e => Number(e.dataset.seq))")
        assert seqs == [2, 1]
        assert not [r for r in tab.requests if "/auth/login" in r]
        refresh_frames = [f for f in sent if f["type"] == "refresh"]
        if notice == "0":
            assert refresh_frames == [] and len(tab.sockets) >= 3
            assert all(s.url.endswith("?since=1") for s in tab.sockets[2:])
        else:
            assert len(refresh_frames) >= 2 and len(tab.sockets) == 1
    finally:
        tab.page.close()  # before its server stops: no reconnect attempts to log
        server.stop()
