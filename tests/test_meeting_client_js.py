"""The unit tests of meeting/static/meeting-client.js (tests/js/meeting-client.test.mjs:
backoff, dedupe by seq, since persistence, close codes, token refresh, heartbeat, sending),
run with Node's built-in test runner. Node is the only tool they need: no npm, no packages."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "js" / "meeting-client.test.mjs"


# --test-reporter came in 18.15 (Debian bookworm has 18.19); older nodes cannot run the suite.
MIN_NODE = (18, 15)
# What Node 18 lacks and later versions have (globalThis.crypto, CustomEvent): the suite runs once
# more with a preload that deletes them, so CI's Debian node 18 cannot fail where we passed.
# --import came in 18.18 (bookworm has 18.19).
NODE18_PRELOAD = ROOT / "tests" / "js" / "node18-globals.mjs"
NODE18_FLAGS = ["--import", NODE18_PRELOAD.as_uri()]

def _node() -> str:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (apt-get install nodejs): the JavaScript client's unit tests need it")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if tuple(int(part) for part in version.lstrip("v").split(".")[:2]) < MIN_NODE:
        unavailable(f"node {version} is too old for the unit tests (needs {'.'.join(map(str, MIN_NODE))} or later)")
    return node


def _run(node: str, *flags: str) -> None:
    run = subprocess.run([node, *flags, "--test", "--test-reporter=tap", str(SUITE)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail) (\d+)$", run.stdout, re.M)}
    assert run.returncode == 0 and counts.get("fail") == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # every test in the file ran (a file that stopped loading half-way would report fewer)
    assert counts["pass"] == counts["tests"] == len(re.findall(r'^test\(', SUITE.read_text(), re.M)) >= 25


def test_meeting_client_js_unit_tests_pass_under_node() -> None:
    _run(_node())


def test_meeting_client_js_unit_tests_pass_without_what_node_18_lacks() -> None:
    node = _node()
    probe = subprocess.run([node, *NODE18_FLAGS, "-e", "console.log(typeof globalThis.crypto, typeof globalThis.CustomEvent)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 and "--import" in probe.stderr:
        pytest.skip("this node has no --import (before 18.18) to preload the removal of crypto and CustomEvent")
    assert probe.stdout.split() == ["undefined", "undefined"], probe.stdout + probe.stderr  # the imitation is real
    _run(node, *NODE18_FLAGS)
