"""The JWT signing key when none is configured: generated once, kept in a file.

No key ships with the code (a published default lets anyone mint a token for any
user), yet `python -m meeting` must start with no setup and its tokens must survive
a restart. So the first start writes a random key to `auth.secret_file` (default:
beside the SQLite database) readable by its owner only, and later starts read it.
With Redis configured there are several instances, and each generating its own key
would make every token valid on one instance only: config refuses that case
(meeting.config.build_config), and an explicit `secret_file` must then already exist.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

from .config import Config, ConfigError

log = logging.getLogger(__name__)
MIN_LENGTH = 32


def default_path(config: Config) -> Path | None:
    """`<database file>.secret` for a SQLite file, `./meeting.secret` for a server
    database; None for an in-memory database (its tokens cannot outlive it anyway)."""
    url = make_url(config.database.url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        return Path(url.database + ".secret")
    return Path("meeting.secret")


def resolve(config: Config) -> str:
    """The configured secret, or the kept one (created now if this is the first start)."""
    if config.auth.secret:
        return config.auth.secret
    path = Path(config.auth.secret_file) if config.auth.secret_file else default_path(config)
    if path is None:
        return secrets.token_urlsafe(48)
    if config.redis.url or path.exists():
        return _read(path)
    return _create(path)


def _read(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"auth.secret_file: cannot read {path}: {exc.strerror}") from None
    if len(secret) < MIN_LENGTH:
        raise ConfigError(f"auth.secret_file: {path} must hold at least {MIN_LENGTH} characters")
    if path.stat().st_mode & 0o077:
        log.warning("the JWT secret file %s is readable by other users: chmod 600 it", path)
    return secret


def _create(path: Path) -> str:
    """Written whole under a temporary name, then linked into place: a process starting at
    the same moment either links first or reads the complete file, never half of it."""
    secret = secrets.token_urlsafe(48)
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp: a new file of an unpredictable name, created exclusively (never through a
        # planted symlink, never an old file's mode), readable by its owner only.
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        temporary = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secret + "\n")
        os.link(temporary, path)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        raise ConfigError(f"auth.secret_file: cannot create {path}: {exc.strerror}") from None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    log.info("generated a JWT signing key in %s (keep it private; tokens stay valid across restarts)", path)
    return secret
