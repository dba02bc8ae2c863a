"""One fixture per resource. Storage-backed tests run on SQLite and MariaDB.

Services are real. When one is unreachable its tests skip with the reason,
unless MEETING_REQUIRE_SERVICES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pymysql
import pytest
import redis
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from meeting.config import Config, build_config, with_overrides
from meeting.db import create_engine, metadata, migrate
from meeting.web import AccessLogger, create_app

from .helpers import Api

REQUIRE_SERVICES = os.environ.get("MEETING_REQUIRE_SERVICES") == "1"
MARIADB_SERVER = os.environ.get("MEETING_TEST_MARIADB", "mysql+aiomysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("MEETING_TEST_REDIS", "redis://127.0.0.1:6379/15")
TEST_SECRET = "test-secret-for-the-suite-only-0123456789"


def unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (MEETING_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def _mysql_connect(url: Any, database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(host=url.host, port=url.port or 3306, user=url.username, password=url.password or "",
                           database=database, connect_timeout=3, charset="utf8mb4", autocommit=True)


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A fresh database for this test session, migrated once; dropped at the end."""
    server = make_url(MARIADB_SERVER)
    try:
        conn = _mysql_connect(server)
    except pymysql.err.MySQLError as exc:
        unavailable(f"MariaDB is not reachable at {server.host}:{server.port}: {exc}")
    name = f"meeting_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    url = server.set(database=name).render_as_string(hide_password=False)
    cfg = build_config({"database": {"url": url}}, environ={}).database
    asyncio.run(_migrate(cfg))
    yield url
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


async def _migrate(cfg: Any) -> None:
    engine = create_engine(cfg)
    await migrate(engine)
    await engine.dispose()


def _clean_mariadb(url: str) -> None:
    parsed = make_url(url)
    conn = _mysql_connect(parsed, parsed.database)
    with conn.cursor() as cur:
        for table in reversed(metadata.sorted_tables):
            cur.execute(f"DELETE FROM `{table.name}`")
    conn.close()


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("mariadb_url")
    _clean_mariadb(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


class LocalCluster:
    """A Redis Cluster of 3 masters and 3 replicas on loopback ports, for this session only.
    A small cluster-node-timeout makes a replica take over a killed master within seconds.
    The servers are this process's children (not daemons): teardown waits for their exit."""

    def __init__(self, ports: list[int], directory: Path):
        self.ports = ports
        self.dir = directory
        self.url = f"redis://127.0.0.1:{ports[0]}/0"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int) -> None:
        old = self.procs.get(port)
        if old is not None:
            old.wait(10)  # reaped before it is replaced
        self.procs[port] = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--logfile", str(self.dir / f"{port}.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGTERM every server, wait for each (SIGKILL after 10 s)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout

    def pid(self, port: int) -> int:
        return self.procs[port].pid

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait(10)

    def slot_of(self, key: str) -> int:
        return int(self.cli(next(p for p in self.ports if self.alive(p)), "cluster", "keyslot", key))

    def masters(self) -> list[int]:
        return [p for p in self.ports if self.alive(p) and "role:master" in self.cli(p, "info", "replication")]

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Reshard one slot (with its keys) from one master to another, as redis-cli --cluster does."""
        source_id, target_id = (self.cli(p, "cluster", "myid").strip() for p in (source, target))
        self.cli(target, "cluster", "setslot", str(slot), "importing", source_id)
        self.cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
        while keys := self.cli(source, "cluster", "getkeysinslot", str(slot), "100").split():
            self.cli(source, "migrate", "127.0.0.1", str(target), "", "0", "5000", "keys", *keys)
        for port in self.masters():
            self.cli(port, "cluster", "setslot", str(slot), "node", target_id)

    def master_of(self, key: str) -> int:
        """The port of the live master that owns `key`'s slot."""
        slot = self.slot_of(key)
        for port in self.ports:
            if not self.alive(port):
                continue
            for line in self.cli(port, "cluster", "nodes").splitlines():
                fields = line.split()
                if "myself" in fields[2] and "master" in fields[2]:
                    for span in fields[8:]:
                        low, _, high = span.partition("-")
                        if low.isdigit() and int(low) <= slot <= int(high or low):
                            return port
        raise AssertionError(f"no live master owns slot {slot}")

    def _all_connected(self, port: int) -> bool:
        nodes = [line.split() for line in self.cli(port, "cluster", "nodes").splitlines() if line.strip()]
        return len(nodes) == len(self.ports) and all("fail" not in n[2] and n[7] == "connected" for n in nodes)

    def _synced(self, port: int) -> bool:
        info = self.cli(port, "info", "replication")
        return "role:master" in info or "master_link_status:up" in info

    def kill_pubsub(self) -> int:
        """Close every pub/sub connection on every live node, as a network fault would."""
        return sum(int(self.cli(p, "client", "kill", "type", "pubsub") or 0) for p in self.ports if self.alive(p))

    def alive(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node says the cluster is ok and knows every other live node as connected, and
        every replica has synchronised with its master (a replica that never did cannot take over)."""
        deadline = time.monotonic() + timeout
        live = [p for p in self.ports if self.alive(p)]
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self.cli(p, "cluster", "info") and self._all_connected(p) and self._synced(p)
                   for p in live):
                return
            time.sleep(0.1)
        raise AssertionError("the local Redis Cluster did not become ok")


def _free_cluster_ports(count: int) -> list[int]:
    """`count` ports P, each with its cluster bus port P + 10000 free too (bound, then released)."""
    ports: list[int] = []
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 55535 or port in ports:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        ports.append(port)
        if len(ports) == count:
            return ports
    unavailable("no free ports (with free bus ports) for a local Redis Cluster")
    raise AssertionError("unreachable")


def _redis_server_major() -> int:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    version = next((word[2:] for word in out.split() if word.startswith("v=")), "0")
    return int(version.split(".")[0] or 0)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """3 masters + 3 replicas on free ports (or MEETING_TEST_CLUSTER_PORTS), torn down at the end.
    (CI's .ci/run installs redis-server; this fixture starts the cluster.)"""
    if not shutil.which("redis-server") or not shutil.which("redis-cli"):
        unavailable("redis-server and redis-cli are needed for the Redis Cluster tests")
    if _redis_server_major() < 7:
        unavailable("the Redis Cluster tests need Redis 7.0 or later (sharded pub/sub)")
    fixed = os.environ.get("MEETING_TEST_CLUSTER_PORTS")
    ports = [int(p) for p in fixed.split(",")] if fixed else _free_cluster_ports(6)
    cluster = LocalCluster(ports, Path(tempfile.mkdtemp(prefix="meeting-cluster-")))
    busy = [p for p in ports if cluster.alive(p)]  # (a leftover of a killed run, on fixed ports)
    if busy:
        unavailable(f"ports {busy} are taken; unset MEETING_TEST_CLUSTER_PORTS or name six free ports")
    try:
        for port in ports:
            cluster.start(port)
        for port in ports:
            deadline = time.monotonic() + 10
            while not cluster.alive(port) and time.monotonic() < deadline:
                time.sleep(0.02)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "1",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        cluster.wait_ok()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)


def base_config(**sections: dict[str, Any]) -> Config:
    """Defaults, a test secret, cheap password hashing and no rate limits (tests send far
    faster than a person; tests/test_ratelimit.py turns them on); environment ignored."""
    cfg = build_config({}, environ={})
    cfg = with_overrides(cfg, auth={"secret": TEST_SECRET, "hash_time_cost": 1, "hash_memory_kib": 1024},
                         limits={"enabled": False})
    return with_overrides(cfg, **sections) if sections else cfg


@pytest.fixture
def config(db_url: str) -> Config:
    return base_config(database={"url": db_url})


@pytest.fixture(params=["redis-off", "redis-on", "redis-down"])
def redis_mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Redis settings for tests that must hold with no Redis, a live one, and a dead one."""
    if request.param == "redis-off":
        return {"url": None}
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "redis-on":
        return {"url": request.getfixturevalue("redis_url"), "prefix": prefix}
    return {"url": "redis://127.0.0.1:1/0", "prefix": prefix, "socket_timeout": 0.2}


@pytest.fixture
def make_client(aiohttp_client: Any) -> Any:
    """Serve an app (or a config) the way `python -m meeting` does: with our access logger."""

    async def _make(app_or_config: Any) -> Any:
        app = create_app(app_or_config) if isinstance(app_or_config, Config) else app_or_config
        server = TestServer(app)
        await server.start_server(access_log_class=AccessLogger)
        return await aiohttp_client(server)

    return _make


@pytest.fixture
async def client(make_client: Any, config: Config) -> Any:
    return await make_client(config)


@pytest.fixture
def api(client: Any) -> Api:
    return Api(client)
