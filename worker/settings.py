"""One frozen settings object: flags first, then SIDECAR_* environment variables, then defaults.

Read once at the edge (the CLI) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

MiB = 1024 * 1024
# Brokers the apply queue was tested on: Redis (kombu's redis transport) and RabbitMQ (py-amqp).
REDIS_SCHEMES = frozenset({"redis", "rediss"})
BROKER_SCHEMES = REDIS_SCHEMES | {"amqp", "amqps", "pyamqp"}


@dataclass(frozen=True)
class Settings:
    """Everything a sidecar process needs to know; see `Settings.load`."""

    data_dir: Path = Path(".sidecar")
    root: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    # The Celery broker: unset means the staging Redis (as before); amqp:// for RabbitMQ.
    broker_url: str | None = None
    redis_prefix: str = "sidecar"
    webhook_secret: str | None = None
    api_token: str | None = None
    # Origins (scheme://host[:port]) besides the server's own that may write from a browser.
    allowed_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    polling: bool = False
    rescan_interval: float = 30.0
    sweep_after: float = 5.0
    line_limit: int = MiB
    visibility_timeout: int = 900
    # An apply failing with an error that is not transient is retried this many times (after
    # apply_retry_backoff, 2x, 4x ... seconds, at most 60), then its target is quarantined.
    apply_retries: int = 5
    apply_retry_backoff: float = 1.0
    # Targets applied per transaction when many are due at once (a completion, the sweep).
    apply_batch: int = 250
    # A bulk edit by filter that matches more targets than this needs `"confirm": <count>`.
    bulk_limit: int = 100_000
    retention_seconds: float = 86400.0
    # Change notifications (worker/delivering.py): a delivery is tried this many times, waiting
    # delivery_backoff, 2x, 4x ... seconds (at most an hour, jittered) between tries, then given
    # up (`sidecar deliveries retry` sends it again); each POST waits delivery_timeout seconds.
    delivery_attempts: int = 10
    delivery_backoff: float = 5.0
    delivery_timeout: float = 10.0
    # Delivered notifications (and events no delivery needs any more) are deleted this long after.
    delivery_retention_seconds: float = 604800.0
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `flags` (None means "not given"), else `SIDECAR_<NAME>`, else defaults."""
        flags = flags or {}
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = flags.get(f.name)
            if given is not None:
                values[f.name] = _convert(f.name, given)
                continue
            raw = env.get("SIDECAR_" + f.name.upper())
            if raw not in (None, ""):
                values[f.name] = _convert(f.name, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        ranges = (  # (broken, variable, what it must be)
            (self.line_limit < 1024, "LINE_LIMIT", "must be at least 1024 bytes"),
            (not 0 < self.port < 65536, "PORT", f"{self.port} is not a TCP port"),
            (self.rescan_interval <= 0, "RESCAN_INTERVAL", "must be positive"),
            (self.apply_retries < 0, "APPLY_RETRIES", "must be 0 or more"),
            (self.apply_retry_backoff < 0, "APPLY_RETRY_BACKOFF", "must be 0 or more seconds"),
            (not 1 <= self.apply_batch <= 10_000, "APPLY_BATCH", "must be between 1 and 10000 targets"),
            (self.bulk_limit < 1, "BULK_LIMIT", "must be at least 1 target"),
            (self.retention_seconds < 0, "RETENTION_SECONDS", "must be 0 or more"),
            (not 1 <= self.delivery_attempts <= 100, "DELIVERY_ATTEMPTS", "must be between 1 and 100"),
            (self.delivery_backoff < 0, "DELIVERY_BACKOFF", "must be 0 or more seconds"),
            (not 0 < self.delivery_timeout <= 300, "DELIVERY_TIMEOUT", "must be between 0 and 300 seconds"),
            (self.delivery_retention_seconds < 0, "DELIVERY_RETENTION_SECONDS", "must be 0 or more"),
        )
        for broken, name, message in ranges:
            if broken:
                raise ConfigError("SIDECAR_" + name, message)
        if self.log_format not in ("text", "json"):
            raise ConfigError("SIDECAR_LOG_FORMAT", "must be text or json")
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{} "):
            raise ConfigError("SIDECAR_REDIS_PREFIX", "must be non-empty without braces or spaces")
        scheme = urlsplit(self.broker_url).scheme if self.broker_url is not None else "redis"
        if scheme not in BROKER_SCHEMES:  # the URL itself is not shown: it may hold a password
            raise ConfigError(
                "SIDECAR_BROKER_URL", f"scheme {scheme!r} is not one of {', '.join(sorted(BROKER_SCHEMES))}"
            )
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ConfigError("SIDECAR_ALLOWED_ORIGINS", f"{origin!r} is not scheme://host[:port]")

    @property
    def redis_url_file(self) -> Path:
        """Where `sidecar up` writes the URL of the private Redis it started."""
        return self.data_dir / "redis.url"

    @property
    def effective_database_url(self) -> str:
        """The database URL: the setting, else SQLite under the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sidecar.db').resolve()}"

    def effective_redis_url(self) -> str:
        """The Redis URL: the setting, else the private server a running `sidecar up` announced."""
        if self.redis_url:
            return self.redis_url
        try:
            return self.redis_url_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                "SIDECAR_REDIS_URL",
                f"not set, and no running `sidecar up` announced one in {self.redis_url_file}",
            ) from None

    def effective_broker_url(self) -> str:
        """The Celery broker URL: the setting, else the staging Redis."""
        return self.broker_url or self.effective_redis_url()

    @property
    def broker_is_redis(self) -> bool:
        """Whether the broker is a Redis (its transport needs a visibility timeout; AMQP does not)."""
        return self.broker_url is None or urlsplit(self.broker_url).scheme in REDIS_SCHEMES

    def require_root(self) -> Path:
        """The watched root, or a ConfigError when none was given."""
        if self.root is None:
            raise ConfigError("SIDECAR_ROOT", "no root folder given (--root or SIDECAR_ROOT)")
        return self.root

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (for `sidecar up` handing settings to its children)."""
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The settings as SIDECAR_* variables, so a child process rebuilds the same object."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out["SIDECAR_" + f.name.upper()] = _render(value)
        return out


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean")


def _origins(raw: Any) -> tuple[str, ...]:
    """Comma-separated origins, each as a browser sends it: no trailing slash, lowercase."""
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    return tuple(p.strip().rstrip("/").lower() for p in parts if p.strip())


_ORIGIN = re.compile(r"https?://[^/\s]+")

_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "allowed_origins": _origins,
    "data_dir": Path,
    "root": Path,
    "port": int,
    "polling": _to_bool,
    "rescan_interval": float,
    "sweep_after": float,
    "line_limit": int,
    "visibility_timeout": int,
    "apply_retries": int,
    "apply_retry_backoff": float,
    "apply_batch": int,
    "bulk_limit": int,
    "retention_seconds": float,
    "delivery_attempts": int,
    "delivery_backoff": float,
    "delivery_timeout": float,
    "delivery_retention_seconds": float,
}


def _convert(name: str, raw: Any) -> Any:
    convert = _CONVERTERS.get(name, str)
    try:
        return convert(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError("SIDECAR_" + name.upper(), f"bad value {raw!r}: {exc}") from None
