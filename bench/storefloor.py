"""The store's own floor for a pipeline row: the rows its applies wrote, written again at once.

After a row, every row the applies left in the store (the owners, their memberships, the index
rows, the history and the watermarks) is read back and written into an empty store made by the
production migrations, in one transaction, the way the apply writes its bulk rows
(`index.bulk_insert`: COPY on PostgreSQL, the DBAPI's executemany on SQLite), with no Redis, no
fold and no Python per entry. No apply of this design can be faster than writing its own rows, so
this bounds the row from below: a row whose store floor alone takes more than twice the ingest
floor cannot reach 50 % of that floor whatever the apply does, and the apply's distance from the
store floor is what a faster apply could still win.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, select

from worker.store.db import make_engine
from worker.store.index import bulk_insert
from worker.store.migrate import upgrade
from worker.store.models import Base

from .common import Context

# In the order their foreign keys need (each table's rows reference only the ones before it).
TABLES = (
    "datasets",
    "dataset_versions",
    "datums",
    "version_files",
    "property_index",
    "property_changes",
    "watermarks",
)


@dataclass(frozen=True)
class StoreFloor:
    seconds: float
    rows: dict[str, int]

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "rows": self.rows}


def measure(ctx: Context, database: str, source_url: str, name: str) -> StoreFloor:
    """The rows of the store at `source_url`, written into a fresh store of the same kind."""
    rows = _read(source_url)
    with _scratch(ctx, database, name) as engine:
        tables = [Base.metadata.tables[t] for t in TABLES]
        start = time.perf_counter()
        with engine.begin() as conn:
            for table in tables:
                _write(conn, table, rows[table.name])
        seconds = time.perf_counter() - start
    return StoreFloor(seconds, {t: len(r) for t, r in rows.items()})


def _read(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: [dict(r._mapping) for r in conn.execute(select(Base.metadata.tables[name]))]
                for name in TABLES
            }
    finally:
        engine.dispose()


def _write(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    # Chunks bound the driver's buffers; one transaction all the same.
    for start in range(0, len(rows), 50_000):
        bulk_insert(conn, table, rows[start : start + 50_000])


@contextmanager
def _scratch(ctx: Context, database: str, name: str) -> Iterator[Engine]:
    with ctx.database(database, f"{name}-store-floor") as url:
        engine = make_engine(url)
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()
