"""The unit tests of meeting/static/meeting-client.js (tests/js/meeting-client.test.mjs:
backoff, dedupe by seq, since persistence, close codes, token refresh, heartbeat, sending),
run with Node's built-in test runner. Node is the only tool they need: no npm, no packages."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "js" / "meeting-client.test.mjs"


def test_meeting_client_js_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (apt-get install nodejs): the JavaScript client's unit tests need it")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        unavailable(f"node {version} has no built-in test runner (18 or later)")
    run = subprocess.run([node, "--test", "--test-reporter=tap", str(SUITE)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail) (\d+)$", run.stdout, re.M)}
    assert run.returncode == 0 and counts.get("fail") == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # every test in the file ran (a file that stopped loading half-way would report fewer)
    assert counts["pass"] == counts["tests"] == len(re.findall(r'^test\(', SUITE.read_text(), re.M)) >= 25
