"""Configuration: one YAML file, every key overridable by ``MEETING_<SECTION>_<KEY>``.

The dataclasses below are the single source of the schema: their types and
``metadata["validate"]`` drive a marshmallow schema built from them, so a bad
value fails at start-up with a message naming the key instead of surfacing
later as a confusing runtime error.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from marshmallow import Schema, ValidationError, fields, validate

ENV_PREFIX = "MEETING_"


class ConfigError(Exception):
    """Raised for any invalid configuration; the message names the bad key."""


def _opt(default: Any, *validators: Any) -> Any:
    return field(default=default, metadata={"validate": list(validators)})


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _opt(8080, validate.Range(1, 65535))
    max_body_size: int = _opt(1024 * 1024, validate.Range(min=1024))
    backlog: int = _opt(4096, validate.Range(1, 65535))
    shutdown_timeout: float = _opt(10.0, validate.Range(min=0.1))
    gc_young_threshold: int = _opt(10_000, validate.Range(1, 1_000_000))


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = _opt("sqlite+aiosqlite:///meeting.db", validate.Length(min=1))
    pool_size: int = _opt(10, validate.Range(1, 1000))
    connect_timeout: float = _opt(5.0, validate.Range(min=0.1))
    echo: bool = False
    auto_migrate: bool = True
    lock_wait_timeout: int = _opt(5, validate.Range(1, 3600))
    transaction_attempts: int = _opt(4, validate.Range(1, 100))
    ping_idle: float = _opt(1.0, validate.Range(min=0.0))


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = None
    cluster: bool = False  # url names one seed node of a Redis Cluster (7.0+: sharded pub/sub)
    # No braces: a `{` in the prefix would become every key's hash tag on a cluster, putting every
    # user's keys on one shard (meeting.redis_client.key).
    prefix: str = _opt("meeting", validate.Length(min=1),
                       validate.Regexp(r"^[^{}]*$", error="must not contain {{ or }} (they set a key's cluster hash tag)"))
    socket_timeout: float = _opt(0.5, validate.Range(min=0.01))
    max_connections: int = _opt(1000, validate.Range(min=1))
    cache_ttl: int = _opt(300, validate.Range(min=1))
    error_log_interval: float = _opt(30.0, validate.Range(min=0))


@dataclass(frozen=True)
class AuthConfig:
    #: None: read from `secret_file`, generated there on first start (meeting.signing).
    secret: str | None = _opt(None, validate.Length(min=32, error="must be at least 32 characters (HS256 needs a 256-bit key)"))
    secret_file: str | None = None
    token_ttl: int = _opt(3600, validate.Range(min=1))
    hash_time_cost: int = _opt(3, validate.Range(1, 20))
    hash_memory_kib: int = _opt(65536, validate.Range(min=8))
    refresh_ttl: int = _opt(30 * 24 * 3600, validate.Range(min=60))
    issuer: str = _opt("meeting", validate.Length(min=1))
    audience: str = _opt("meeting", validate.Length(min=1))
    revocation_poll: float = _opt(0.5, validate.Range(min=0.05))
    hash_workers: int = _opt(2, validate.Range(1, 256))
    hash_queue: int = _opt(64, validate.Range(0, 100_000))


def _origins(value: str) -> None:
    for origin in filter(None, (o.strip() for o in value.split(","))):
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            raise ValidationError(f"{origin!r} is not an origin like https://app.example.com")


@dataclass(frozen=True)
class PushConfig:
    enabled: bool = True
    heartbeat: float = _opt(30.0, validate.Range(min=0.05))
    max_connections_per_user: int = _opt(10, validate.Range(min=1))
    queue_limit: int = _opt(1000, validate.Range(min=1))
    queue_bytes: int = _opt(1024 * 1024, validate.Range(min=64 * 1024))
    backlog_frame_bytes: int = _opt(256 * 1024, validate.Range(min=1024))
    max_frame_size: int = _opt(65536, validate.Range(min=256))
    cleanup_interval: float = _opt(60.0, validate.Range(min=0.01))
    backlog_limit: int = _opt(1000, validate.Range(min=0))
    token_expiry_notice: float = _opt(60.0, validate.Range(min=0))
    receipt_window: float = _opt(1.0, validate.Range(0, 60))
    receipt_pending_max: int = _opt(10_000, validate.Range(min=1))
    receipt_readers_max: int = _opt(100, validate.Range(1, 1000))
    compress: bool = False
    allowed_origins: str = _opt("", _origins)
    sync_point_batch: int = _opt(25, validate.Range(1, 500))
    sync_point_lanes: int = _opt(4, validate.Range(1, 64))
    admit_batch: int = _opt(500, validate.Range(1, 5000))


@dataclass(frozen=True)
class IdempotencyConfig:
    ttl: int = _opt(86400, validate.Range(min=1))
    max_key_length: int = _opt(255, validate.Range(1, 255))  # the column holds 255
    prune_interval: float = _opt(600.0, validate.Range(min=0.01))


def _networks(value: str) -> None:
    import ipaddress

    for net in filter(None, (n.strip() for n in value.split(","))):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValidationError(f"{net!r} is not a network like 10.0.0.0/8") from None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    allow: str = _opt("", _networks)


def _rate(value: str) -> None:
    from limits import parse

    try:
        parse(value)
    except ValueError:
        raise ValidationError(f"{value!r} is not a rate like 10/minute or 10/15 minutes") from None


@dataclass(frozen=True)
class LimitsConfig:
    enabled: bool = True
    login_failures_per_username: str = _opt("10/15 minutes", _rate)
    logins_per_address: str = _opt("60/minute", _rate)
    registrations_per_address: str = _opt("30/hour", _rate)
    sends_per_user: str = _opt("20/second", _rate)
    connects_per_user: str = _opt("30/minute", _rate)
    connects_per_address: str = _opt("120/minute", _rate)
    chat_per_connection: str = _opt("5/second", _rate)
    strikes: int = _opt(10, validate.Range(1, 10_000))
    trusted_proxies: str = _opt("", _networks)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt("INFO", validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    push: PushConfig = field(default_factory=PushConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_FIELD_TYPES: dict[Any, type[fields.Field]] = {
    str: fields.String, int: fields.Integer, float: fields.Float, bool: fields.Boolean,
}


def _section_schema(cls: type) -> Schema:
    hints = typing.get_type_hints(cls)
    declared: dict[str, fields.Field] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = type(None) in typing.get_args(hint)
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        declared[f.name] = _FIELD_TYPES[base](
            allow_none=optional, validate=f.metadata.get("validate", []),
            **({"strict": True} if base is int else {}),
        )
    return Schema.from_dict(declared, name=cls.__name__)()


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Environment values are parsed as YAML scalars, so `10` is an int and `true` a bool."""
    sections = _sections()
    result: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in sections:
            continue  # not a config variable (e.g. MEETING_REQUIRE_SERVICES)
        known = {f.name for f in dataclasses.fields(sections[section])}
        if key not in known:
            raise ConfigError(f"{name}: unknown setting {section}.{key!r}; known: {', '.join(sorted(known))}")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, (dict, list)):
            value = raw
        result.setdefault(section, {})[key] = value
    return result


def build_config(data: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Validate ``data`` (file contents) with ``environ`` applied on top."""
    data = dict(data or {})
    sections = _sections()
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    overrides = _env_overrides(os.environ if environ is None else environ)
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        raw = data.get(name) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{name}: must be a mapping")
        merged = {**raw, **overrides.get(name, {})}
        try:
            loaded = _section_schema(cls).load(merged)
        except ValidationError as exc:
            key, msgs = next(iter(exc.normalized_messages().items()))
            raise ConfigError(f"{name}.{key}: {' '.join(map(str, msgs))}") from None
        built[name] = cls(**loaded)
    config = Config(**built)
    if config.push.backlog_frame_bytes > config.push.queue_bytes // 2:
        raise ConfigError("push.backlog_frame_bytes: at most half of push.queue_bytes, or one backlog frame fills a socket's queue")
    if config.redis.cluster and not config.redis.url:
        raise ConfigError("redis.cluster: needs redis.url, the address of one node of the cluster (e.g. redis://10.0.0.5:6379/0)")
    if config.redis.url and not config.auth.secret and not config.auth.secret_file:
        raise ConfigError(
            "auth.secret: must be set when redis.url is (every instance must sign and check tokens with the same "
            "key); generate one with `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'` and give the "
            "same value to every instance as MEETING_AUTH_SECRET (or auth.secret in the config file)")
    return config


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or ``./config.yaml`` if present, else the defaults)."""
    if path is None and Path("config.yaml").is_file():
        path = "config.yaml"
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path} must be a mapping of sections")
    return build_config(data, environ)


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of ``config`` with some keys replaced (used by tests and tools)."""
    changed = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **changed)
