"""Fixtures for real services: Redis (database 15 or a private server) and SQLite/PostgreSQL.

Redis is never skipped: when nothing answers at SIDECAR_TEST_REDIS_URL a private redis-server is
started. PostgreSQL is skipped with a visible reason locally when unreachable, and required when
CI=true. Every test gets its own Redis key prefix and its own tables, and cleans them up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import Engine

from worker.keys import Keys
from worker.settings import Settings
from worker.staging import Staging
from worker.store.db import make_engine
from worker.store.models import Base

DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The machines are shared and noisy: judge hypothesis tests by their assertions, not their speed.
hypothesis_settings.register_profile(
    "sidecar", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
hypothesis_settings.load_profile("sidecar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("SIDECAR_TEST_REDIS_URL", DEFAULT_REDIS)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        yield url
        return
    except redis.ConnectionError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(f"no Redis at {url} and no redis-server on PATH to start one")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/15"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    _clean(client, prefix)
    yield client
    _clean(client, prefix)
    client.close()


def _clean(client: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    for pattern in (keys.pattern(), f"{keys.queue}*", f"_kombu.binding*.{keys.queue}*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)


@pytest.fixture
def staging(redis_client: redis.Redis, prefix: str) -> Staging:
    return Staging(redis_client, Keys(prefix))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = os.environ.get("SIDECAR_TEST_DATABASE_URL", DEFAULT_POSTGRES)
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
        engine.dispose()
    except sqlalchemy.exc.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {url}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {url} (set SIDECAR_TEST_DATABASE_URL)")
    return url


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema of this test only."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(postgres_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sidecar.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    # Tables straight from the models, for speed; tests/test_migrations.py checks that the
    # migrations build exactly these. The database is private to the test (a temporary file, or
    # a PostgreSQL schema dropped afterwards), so there is nothing to drop here.
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, prefix: str, database_url: str) -> Settings:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return Settings(
        data_dir=tmp_path / "data",
        root=root,
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        rescan_interval=2.0,
        sweep_after=1.0,
    )
