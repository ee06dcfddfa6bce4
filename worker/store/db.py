"""Engines for SQLite and PostgreSQL, set up for one writer per target at a time."""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_MS = 30_000
# Pages the WAL may hold before a commit copies them back into the database (SQLite: 1,000). An
# apply dirties ~200 scattered index pages; at 1,000 a checkpoint ran every 5 applies, copying the
# same hot pages again each time, inside the commit that the other worker waits for. At 16,000
# (~64 MB of WAL) a page changed by many applies is copied once: commit 3.4 -> 2.6 ms.
SQLITE_WAL_PAGES = 16_000


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the only PostgreSQL driver we install)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def json_text(value: Any) -> str:
    """How JSON columns are written: orjson (a tenth of the apply's time went to `json.dumps`),
    and the standard library for what orjson refuses, such as an integer beyond 64 bits."""
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine; on SQLite with WAL, a busy timeout, and `BEGIN IMMEDIATE` where asked for."""
    url = normalize_url(url)
    kwargs.setdefault("json_serializer", json_text)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000}, **kwargs)
        _sqlite_setup(engine)
        return engine
    # orjson reads a page of 1,000 property sets (3,000 JSON columns) in a fraction of the
    # stdlib's time; what is stored holds nothing it reads differently (integers are bounded to
    # 64 bits: limits.py). SQLite's driver hands some JSON results over as numbers: stdlib there.
    kwargs.setdefault("json_deserializer", orjson.loads)
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    _postgres_setup(engine)
    return engine


def writer(engine: Engine) -> Engine:
    """The engine for apply transactions. On SQLite they start with `BEGIN IMMEDIATE`, taking the
    database's write lock up front, so two applies never interleave and never deadlock on upgrade."""
    return engine.execution_options(sqlite_begin="IMMEDIATE")


def _postgres_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # psycopg prepares a statement on the server after its 5th run, and PostgreSQL then
        # settles on one generic plan for it. A worker that starts on a fresh database plans the
        # index DELETE while `property_index` is nearly empty, picks an index on `owner_kind`
        # alone (every version's rows get scanned), and keeps it until autovacuum's ANALYZE
        # invalidates it: applies got slower with every version (2 workers at 29 versions/s
        # instead of ~200 in `make bench`; tests/test_index.py shows the plan). Search plans
        # depend on the values too (`split = "train"` against a run id). Plan each execution for
        # its own parameters; the statements stay prepared, so parsing is still saved.
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET plan_cache_mode = force_custom_plan")
            # A search over 1M versions is costed high enough to be JIT-compiled, which took
            # 6 ms of a 10 ms first page; our statements are short and indexed: no JIT.
            cursor.execute("SET jit = off")
        dbapi_connection.commit()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite would otherwise defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # busy_timeout first: switching a fresh file to WAL takes a lock, and processes starting
        # together (serve --migrate beside worker --migrate) must wait for it, not fail.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")
