"""What the browser tests share (tests/test_browser.py, tests/test_browser_races.py): a real
`python -m meeting` process (SQLite), Debian's Chromium driven by Playwright, and pages
that record their console errors.

One browser per test module; each test gets fresh browser contexts (no shared storage) and
its own users. Waits are Playwright's auto-waiting assertions (polls with a deadline),
never sleeps.
"""

from __future__ import annotations

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


def shown(tab: Tab) -> list[tuple[int, int, str]]:
    """(seq, id, data-read) of every message the page shows, top to bottom."""
    return [tuple(x) for x in tab.page.get_by_test_id("message").evaluate_all(
        "els => els.map(e => [Number(e.dataset.seq), Number(e.dataset.messageId), e.dataset.read])")]
