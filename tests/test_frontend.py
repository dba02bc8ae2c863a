"""meeting.frontend: the page and its files are served with the right types, caching and
security headers; every API response carries the headers too; the page runs nothing
inline (the CSP would refuse it); the files ship in the package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from meeting.frontend import API_CSP, FILES, PAGE_CSP
from tests.helpers import Api

ROOT = Path(__file__).resolve().parent.parent


def test_every_static_file_is_served() -> None:
    """The client's modules import each other by path: one missing from FILES would be a 404
    in the browser (and a dead page), not an error here."""
    static = ROOT / "meeting" / "static"
    assert {p.name for p in static.iterdir() if p.is_file()} == {name for name, _ in FILES.values()}


async def test_the_page_and_its_files_are_served_with_a_strict_csp(api: Api) -> None:
    for path, (name, content_type) in FILES.items():
        resp = await api.client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Type"] == content_type
        assert resp.headers["Content-Security-Policy"] == PAGE_CSP
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["Referrer-Policy"] == "no-referrer"
        assert await resp.read() == (ROOT / "meeting" / "static" / name).read_bytes()
        again = await api.client.get(path, headers={"If-None-Match": resp.headers["ETag"]})
        assert again.status == 304 and await again.read() == b""
        assert (await api.client.get(path, headers={"If-None-Match": "*"})).status == 304, path
        assert (await api.client.get(path, headers={"If-None-Match": '"other"'})).status == 200, path
    assert "default-src 'self'" in PAGE_CSP and "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP


async def test_api_responses_carry_nosniff_and_a_deny_all_csp(api: Api) -> None:
    for path, status in (("/healthz", 200), ("/no/such/route", 404), ("/users/me", 401)):
        resp = await api.client.get(path)
        assert resp.status == status
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Security-Policy"] == API_CSP
        assert resp.content_type == "application/json"


class _Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.testids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.problems.append("inline <script>")
        if tag == "style" or "style" in names:
            self.problems.append(f"inline style on <{tag}>")
        self.problems += [f"{k} handler on <{tag}>" for k in names if k.startswith("on")]
        if names.get("data-testid"):
            self.testids.add(str(names["data-testid"]))


def test_the_page_has_no_inline_script_or_style_and_the_static_part_of_the_dom_contract() -> None:
    page = _Inline()
    page.feed((ROOT / "meeting" / "static" / "index.html").read_text(encoding="utf-8"))
    assert page.problems == []
    assert page.testids == {
        "login-username", "login-password", "login-submit", "register-submit", "login-error", "current-user", "logout",
        "connection-status", "unread-count", "message-list", "mark-all-read", "compose-recipients", "compose-content",
        "compose-send", "compose-error", "error-banner", "reconnect",
    }
    # the per-message ones are made by the page's script; docs/frontend.md lists them all
    script = (ROOT / "meeting" / "static" / "app.js").read_text(encoding="utf-8")
    guide = (ROOT / "docs" / "frontend.md").read_text(encoding="utf-8")
    made = {"message", "message-sender", "message-content", "mark-read", "sent-message", "sent-receipts", "receipt"}
    for testid in made:
        assert f'testid = "{testid}"' in script, testid
    for testid in page.testids | made:
        assert f"`{testid}`" in guide, testid
    assert "innerHTML" not in script and "eval(" not in script


def test_a_built_wheel_ships_the_web_client(tmp_path: Path) -> None:
    """A non-editable install serves the page too: the files are package data. Built from
    a copy of the sources, so the build leaves nothing in the working tree."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "meeting", source / "meeting", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = tmp_path.glob("meeting-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"meeting/static/{name}" for name, _ in FILES.values()} <= names
    assert not [n for n in names if re.match(r"tests/", n)]


def test_the_client_code_in_websocket_md_is_lifted_verbatim_from_the_module() -> None:
    """docs/websocket.md shows the core of the served client; a hand-written sketch there went
    stale once (dedupe by id, other jitter), so each block must still be in the module."""
    guide = (ROOT / "docs" / "websocket.md").read_text(encoding="utf-8")
    module = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "meeting" / "static").glob("*.js")))
    blocks = re.findall(r"^```js\n(.*?)^```$", guide, re.S | re.M)
    assert len(blocks) >= 3
    for block in blocks:
        assert block in module, block
