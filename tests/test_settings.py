"""Settings: flags over SIDECAR_* variables over defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import Settings


def test_precedence() -> None:
    env = {"SIDECAR_PORT": "9000", "SIDECAR_ROOT": "/env/root", "SIDECAR_POLLING": "yes"}
    s = Settings.load({"port": 9100, "root": None}, env=env)
    assert s.port == 9100 and s.root == Path("/env/root") and s.polling is True
    assert Settings.load({}, env={}).port == 8000


def test_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="SIDECAR_PORT"):
        Settings.load({}, env={"SIDECAR_PORT": "eighty"})
    with pytest.raises(ConfigError, match="SIDECAR_LINE_LIMIT"):
        Settings.load({}, env={"SIDECAR_LINE_LIMIT": "10"})


def test_defaults_find_the_private_redis(tmp_path: Path) -> None:
    s = Settings.load({"data_dir": tmp_path}, env={})
    with pytest.raises(ConfigError, match="SIDECAR_REDIS_URL"):
        s.effective_redis_url()
    s.redis_url_file.write_text("redis://127.0.0.1:1234/0\n")
    assert s.effective_redis_url() == "redis://127.0.0.1:1234/0"
    assert s.effective_database_url.startswith("sqlite:///") and s.effective_database_url.endswith(
        "sidecar.db"
    )


def test_round_trip_through_the_environment(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, root=tmp_path / "r", redis_url="redis://x/1", polling=True, port=1234)
    assert Settings.load({}, env=s.as_env()) == s


def test_broker_url() -> None:
    s = Settings.load({}, env={"SIDECAR_REDIS_URL": "redis://r/0"})
    assert s.effective_broker_url() == "redis://r/0" and s.broker_is_redis
    amqp = "amqp://guest:secret@rabbit:5672//"
    s = Settings.load({}, env={"SIDECAR_REDIS_URL": "redis://r/0", "SIDECAR_BROKER_URL": amqp})
    assert s.effective_broker_url() == amqp and not s.broker_is_redis
    assert Settings.load({}, env=s.as_env()).broker_url == amqp  # `sidecar up` hands it to its children
    with pytest.raises(ConfigError, match="SIDECAR_BROKER_URL") as err:
        Settings.load({}, env={"SIDECAR_BROKER_URL": "sqs://key:secret@queue"})
    assert "secret" not in str(err.value)  # the URL may hold a password: only its scheme is named


def test_allowed_origins() -> None:
    env = {"SIDECAR_ALLOWED_ORIGINS": "https://ops.example, http://Localhost:3000/,"}
    s = Settings.load({}, env=env)
    assert s.allowed_origins == ("https://ops.example", "http://localhost:3000")
    assert Settings.load({}, env=s.as_env()).allowed_origins == s.allowed_origins
    assert Settings.load({}, env={}).allowed_origins == ()
    with pytest.raises(ConfigError, match="SIDECAR_ALLOWED_ORIGINS"):
        Settings.load({}, env={"SIDECAR_ALLOWED_ORIGINS": "ops.example/path"})


def test_one_version_string_from_the_package_metadata() -> None:
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    import worker

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "version"
    ]
    assert worker.__version__ == declared
    out = subprocess.run([sys.executable, "-m", "worker.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"sidecar {declared}"
