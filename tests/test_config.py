from pathlib import Path

import pytest
import yaml

from meeting.config import Config, ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_yaml_states_exactly_the_defaults() -> None:
    data = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    assert load_config(ROOT / "config.yaml", environ={}) == Config()
    assert set(data) == set(Config.__dataclass_fields__)


def test_environment_overrides_file_with_typed_values() -> None:
    cfg = build_config(
        {"database": {"url": "sqlite+aiosqlite:///a.db"}},
        environ={"MEETING_DATABASE_URL": "mysql+aiomysql://u@h/db", "MEETING_DATABASE_POOL_SIZE": "3",
                 "MEETING_DATABASE_ECHO": "true", "MEETING_REDIS_URL": "redis://x:1/0", "MEETING_REQUIRE_SERVICES": "1",
                 "MEETING_AUTH_SECRET": "a-secret-of-at-least-thirty-two-chars"},
    )
    assert cfg.database.url == "mysql+aiomysql://u@h/db"
    assert cfg.database.pool_size == 3 and cfg.database.echo is True
    assert cfg.redis.url == "redis://x:1/0"
    assert build_config({}, environ={"MEETING_PUSH_RECEIPT_WINDOW": "0.25"}).push.receipt_window == 0.25
    assert build_config({}, environ={}).push.receipt_window == 1.0  # the default the issue asked for
    assert build_config({}, environ={"MEETING_PUSH_RECEIPT_PENDING_MAX": "5"}).push.receipt_pending_max == 5


@pytest.mark.parametrize(
    ("data", "environ", "named"),
    [
        ({"database": {"pool_size": "many"}}, {}, "database.pool_size"),
        ({"server": {"port": 70000}}, {}, "server.port"),
        ({"server": {"prot": 1}}, {}, "server.prot"),
        ({"databse": {}}, {}, "databse"),
        ({}, {"MEETING_DATABASE_URLL": "x"}, "MEETING_DATABASE_URLL"),
        ({}, {"MEETING_LOGGING_LEVEL": "LOUD"}, "logging.level"),
        ({"auth": {"secret": ""}}, {}, "auth.secret"),
        ({"auth": {"secret": "short"}}, {}, "auth.secret"),
        ({"push": {"queue_bytes": 65536, "backlog_frame_bytes": 65536}}, {}, "push.backlog_frame_bytes"),
        ({"push": {"receipt_window": -1}}, {}, "push.receipt_window"),
        ({}, {"MEETING_PUSH_RECEIPT_WINDOW": "61"}, "push.receipt_window"),
        ({"push": {"receipt_pending_max": 0}}, {}, "push.receipt_pending_max"),
        ({}, {"MEETING_REDIS_PREFIX": "app{1}"}, "redis.prefix"),  # would be every key's cluster hash tag
    ],
)
def test_bad_settings_fail_loudly_naming_the_key(data: dict, environ: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        build_config(data, environ=environ)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_no_secret_ships_and_redis_without_one_is_refused() -> None:
    assert build_config({}, environ={}).auth.secret is None
    with pytest.raises(ConfigError, match=r"auth\.secret: must be set when redis\.url is.*token_urlsafe"):
        build_config({"redis": {"url": "redis://127.0.0.1:6379/0"}}, environ={})
    with pytest.raises(ConfigError, match=r"auth\.secret"):  # an empty variable is no secret either
        build_config({}, environ={"MEETING_REDIS_URL": "redis://127.0.0.1:6379/0", "MEETING_AUTH_SECRET": ""})
    shared = build_config({}, environ={"MEETING_REDIS_URL": "redis://127.0.0.1:6379/0", "MEETING_AUTH_SECRET": "s" * 32})
    assert shared.auth.secret == "s" * 32
