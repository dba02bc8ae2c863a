"""The web client at `/` in a real browser: Debian's Chromium driven by Playwright, against
a real `python -m meeting` process (SQLite), through the DOM contract of docs/frontend.md.

One browser for the module; each test gets fresh browser contexts (no shared storage) and
its own users. Waits are Playwright's auto-waiting assertions (polls with a deadline),
never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.conftest import TEST_SECRET, unavailable
from tests.test_main import _free_port

PASSWORD = "correct horse"
WAIT = 15_000  # ms: the deadline of every wait on the page


def _chromium() -> str | None:
    for candidate in (os.environ.get("MEETING_CHROMIUM"), "/usr/bin/chromium", "/usr/lib/chromium/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Server:
    """`python -m meeting` on a fixed port and database, which can be stopped (SIGTERM) and
    started again: the same address and data, a new process."""

    def __init__(self, workdir: Path, port: int | None = None, db: Path | None = None, **env: str):
        self.workdir = workdir
        self.env = env
        self.port = port or _free_port()
        self.db = db or workdir / "browser.db"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()

    def start(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEETING_")}
        env.update(MEETING_DATABASE_URL=f"sqlite+aiosqlite:///{self.db}", MEETING_AUTH_SECRET=TEST_SECRET,
                   MEETING_AUTH_HASH_TIME_COST="1", MEETING_AUTH_HASH_MEMORY_KIB="1024", MEETING_LIMITS_ENABLED="false",
                   MEETING_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1", **self.env)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "meeting", "--port", str(self.port)], cwd=self.workdir,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # ready when /healthz answers
            assert self.proc.poll() is None, "server exited:\n" + self.log.read_text()
            try:
                if self.http.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.http.close()
        self.http = requests.Session()

    def call(self, method: str, path: str, token: str | None = None, expect: int = 200, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = self.http.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        assert resp.status_code == expect, (method, path, resp.status_code, resp.text)
        return resp.json() if resp.content else None

    def user(self, prefix: str, display_name: str | None = None) -> dict[str, Any]:
        """A registered, logged-in user (over REST)."""
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        body = {"username": name, "password": PASSWORD} | ({"display_name": display_name} if display_name else {})
        self.call("POST", "/auth/register", json=body, expect=201)
        login = self.call("POST", "/auth/login", json={"username": name, "password": PASSWORD})
        return {**login["user"], "token": login["access_token"]}

    def send(self, sender: dict[str, Any], to: dict[str, Any], content: str) -> dict[str, Any]:
        return self.call("POST", "/messages", sender["token"], expect=201,  # type: ignore[no-any-return]
                         json={"recipient_ids": [to["id"]], "content": content})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = _chromium()
    if path is None:
        unavailable("no Chromium found (apt-get install chromium, or set MEETING_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"Playwright is not installed: {exc}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("browser")).start()
    yield srv
    srv.stop()


class Tab:
    """A page with what it logged: console errors, uncaught exceptions, requests. A test that
    provokes console errors on purpose (a server stopped, a 503) names them in `allowed`."""

    def __init__(self, page: Any):
        self.page = page
        self.allowed: list[str] = []  # regular expressions
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[str] = []
        self.sockets: list[Any] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))
        page.on("websocket", lambda ws: self.sockets.append(ws))

    def get(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    def unexpected_console_errors(self) -> list[str]:
        return [e for e in self.console_errors if not any(re.search(a, e) for a in self.allowed)]

    def message(self, message_id: int) -> Any:
        return self.page.locator(f'[data-testid="message"][data-message-id="{message_id}"]')


@pytest.fixture
def tabs(browser: Any) -> Iterator[Any]:
    """Open tabs, each in a context of its own (its own storage: its own device) unless
    `context` is given; every tab must end without an uncaught exception or a console error
    (CSP violations, failed loads, errors logged), except those its test allowed."""
    contexts: list[Any] = []
    opened: list[Tab] = []

    def open_tab(context: Any = None, **options: Any) -> Tab:
        if context is None:
            context = browser.new_context(**options)
            context.set_default_timeout(WAIT)
            contexts.append(context)
        tab = Tab(context.new_page())
        opened.append(tab)
        return tab

    yield open_tab
    for context in contexts:
        context.close()
    assert [e for tab in opened for e in tab.page_errors] == []
    assert [e for tab in opened for e in tab.unexpected_console_errors()] == []


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as pw_expect
    return pw_expect(locator)


def log_in(tab: Tab, server: Server, username: str, register: bool = False) -> None:
    tab.page.goto(server.url + "/")
    tab.get("login-username").fill(username)
    tab.get("login-password").fill(PASSWORD)
    tab.get("register-submit" if register else "login-submit").click()
    expect(tab.get("current-user")).to_have_text(username, timeout=WAIT)
    expect(tab.get("connection-status")).to_have_attribute("data-state", "connected", timeout=WAIT)


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


def _shown(tab: Tab) -> list[tuple[int, int, str]]:
    """(seq, id, data-read) of every message the page shows, top to bottom."""
    return [tuple(x) for x in tab.page.get_by_test_id("message").evaluate_all(
        "els => els.map(e => [Number(e.dataset.seq), Number(e.dataset.messageId), e.dataset.read])")]


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
    assert _shown(tab) == expected
    assert tab.sockets[-1].url.endswith("?since=1")
    other = tabs()  # another browser: no since stored, so the unread backlog fills it
    log_in(other, server, bob["username"])
    expect(other.page.get_by_test_id("message")).to_have_count(61)
    expect(other.get("unread-count")).to_have_text("61")
    assert _shown(other) == expected
    assert other.sockets[-1].url.endswith("/ws/messages")


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
    assert [seq for seq, _, _ in _shown(tab)] == [3, 2, 1]


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
