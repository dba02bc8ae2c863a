"""The JWT key when none is configured: generated once, kept private, read back (meeting.signing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meeting import signing
from meeting.config import ConfigError, with_overrides
from meeting.web import create_app
from tests.conftest import base_config
from tests.helpers import Api


def _keyless(tmp_path: Path, **auth: Any) -> Any:
    cfg = base_config(database={"url": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"})
    return with_overrides(cfg, auth={"secret": None, **auth})


async def test_a_token_survives_a_restart_with_the_generated_key(make_client: Any, tmp_path: Path) -> None:
    first = Api(await make_client(_keyless(tmp_path)))
    user = await first.user()
    key_file = tmp_path / "app.db.secret"
    assert key_file.stat().st_mode & 0o777 == 0o600
    await first.client.close()
    second = Api(await make_client(_keyless(tmp_path)))  # a restart: same config, same file
    assert (await second.call("GET", "/users/me", user=user, expect=200))["id"] == user.id


def test_an_explicit_secret_file_is_created_where_configured_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "jwt.key"
    created = signing.resolve(_keyless(tmp_path, secret_file=str(path)))
    assert path.read_text().strip() == created and signing.resolve(_keyless(tmp_path, secret_file=str(path))) == created
    assert not any(p.name.startswith(".jwt.key") for p in path.parent.iterdir())  # no temporary left behind


def test_a_configured_secret_is_used_as_it_is_and_no_file_is_written(tmp_path: Path) -> None:
    cfg = with_overrides(_keyless(tmp_path), auth={"secret": "x" * 40})
    assert signing.resolve(cfg) == "x" * 40 and not (tmp_path / "app.db.secret").exists()


def test_in_memory_databases_get_a_key_for_the_process_only(tmp_path: Path) -> None:
    cfg = with_overrides(_keyless(tmp_path), database={"url": "sqlite+aiosqlite:///:memory:"})
    assert signing.default_path(cfg) is None and len(signing.resolve(cfg)) >= 32
    assert signing.default_path(with_overrides(cfg, database={"url": "mysql+aiomysql://root@127.0.0.1/meeting"})) == Path("meeting.secret")


def test_bad_key_files_fail_loudly_naming_the_setting(tmp_path: Path, caplog: Any) -> None:
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    with pytest.raises(ConfigError, match="auth.secret_file: .* at least 32"):
        create_app(_keyless(tmp_path, secret_file=str(short)))
    with pytest.raises(ConfigError, match="auth.secret_file: cannot read"):  # several instances: never generated
        signing.resolve(with_overrides(_keyless(tmp_path, secret_file=str(tmp_path / "missing.key")), redis={"url": "redis://127.0.0.1:1/0"}))
    loose = tmp_path / "loose.key"
    loose.write_text("k" * 40)
    loose.chmod(0o644)
    assert signing.resolve(_keyless(tmp_path, secret_file=str(loose))) == "k" * 40
    assert any("readable by other users" in r.getMessage() and "k" * 40 not in r.getMessage() for r in caplog.records)


def test_a_leftover_file_at_an_old_temporary_name_changes_nothing(tmp_path: Path) -> None:
    import os

    planted = tmp_path / f".app.db.secret.{os.getpid()}"
    planted.write_text("planted\n")
    planted.chmod(0o644)
    secret = signing.resolve(_keyless(tmp_path))
    key_file = tmp_path / "app.db.secret"
    assert key_file.read_text().strip() == secret and key_file.stat().st_mode & 0o777 == 0o600
    assert planted.read_text() == "planted\n"
