"""A large store for the search and page benchmarks, bulk loaded through the production schema.

The schema is the one `sidecar db upgrade` makes (`worker.store.migrate.upgrade`, the Alembic
migrations). Rows go into the real tables through the store's own bulk path
(`worker.store.index.bulk_insert`: `COPY` on PostgreSQL, the DBAPI's executemany on SQLite),
and the search index rows of every dataset and version are made by the production
`worker.store.index.index_rows`, as an apply makes them. The secondary indexes of the three big
tables are dropped for the load and created again afterwards from the models' own definitions
(the migrations create the same ones: `tests/test_migrations.py` compares them), then the
tables are analyzed, as a database that has been running a while would be.

Each version has 11 top-level properties (13 index rows: one nested object of two keys), each
dataset 10; 10 versions per dataset. Values are drawn from a seeded generator, so a size always
builds the same store:

| key | values | a filter on it |
|---|---|---|
| `run_id` | `run-0000001` … unique | equality, 1 match |
| `score` | uniform [0, 1) | `score > 0.9999`: 0.01 % |
| `sample_count` | integer 0 … 9,999 | `sample_count > 8500`: 15 % |
| `shift` | night, day, evening | a third |
| `split` | train, val, test | a third (non-selective) |
| `reviewed` | true / false | half |
| `camera` | `{"fps": 10…60, "serial": "SN-0000001" unique}` | nested key |
| `machine` | press-01 … press-20 | `machine = "press-04"`: 5 % |
| `defect_rate` | uniform [0, 0.01) | `defect_rate < 0.001`: 10 % |
| `preprocessing_version` | `1.0` … `3.9` | `like "3.%"`: a third |
| `audit` | `"passed"`, on 0.1 % of versions only | `exists audit` |
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Index, Table, text

from worker.ids import new_id
from worker.store import migrate
from worker.store.index import bulk_insert, index_rows
from worker.store.models import Base, Dataset, DatasetVersion, PropertyIndex

VERSIONS_PER_DATASET = 10
CHUNK = 50_000  # versions per transaction
SHIFTS = ("night", "day", "evening")
SPLITS = ("train", "val", "test")
MACHINES = tuple(f"press-{n:02d}" for n in range(1, 21))
PREPROCESSING = tuple(f"{major}.{minor}" for major in (1, 2, 3) for minor in range(10))
# The big tables whose secondary indexes are dropped for the load and built again after it.
_BULK = (Dataset, DatasetVersion, PropertyIndex)


@dataclass(frozen=True)
class Built:
    versions: int
    datasets: int
    index_rows: int
    seconds: float
    load_seconds: float  # rows made and written, indexes not yet built
    index_seconds: float


def version_properties(rng: random.Random, i: int) -> dict[str, Any]:
    """Version `i`'s property set (see the module docstring)."""
    r = rng.random
    props: dict[str, Any] = {
        "run_id": f"run-{i:07d}",
        "score": r(),
        "sample_count": int(r() * 10_000),
        "shift": SHIFTS[int(r() * 3)],
        "split": SPLITS[int(r() * 3)],
        "reviewed": r() < 0.5,
        "camera": {"fps": 10 + int(r() * 51), "serial": f"SN-{i:07d}"},
        "machine": MACHINES[int(r() * 20)],
        "defect_rate": r() / 100,
        "preprocessing_version": PREPROCESSING[int(r() * 30)],
    }
    if r() < 0.001:
        props["audit"] = "passed"
    return props


def dataset_properties(rng: random.Random, d: int) -> dict[str, Any]:
    return {
        "domain": f"domain-{d % 10}",
        "owner": f"owner-{d % 50}",
        "project_code": f"prj-{d:06d}",
        "retention_days": (30, 90, 365)[d % 3],
        "material": "stainless-steel-304",
        "region": ("eu", "us", "ap")[d % 3],
        "active": rng.random() < 0.8,
        "budget": int(rng.random() * 100_000),
        "cost_center": f"cc-{d % 100}",
        "description": "Press line surface inspection images",
    }


def build(engine: Engine, versions: int, *, chunk: int = CHUNK) -> Built:
    """Create the production schema in `engine`'s (empty) database and load `versions` versions
    (a multiple of 10) with their datasets and index rows."""
    start = time.perf_counter()
    migrate.upgrade(engine)
    indexes = [index for model in _BULK for index in _table(model).indexes]
    with engine.begin() as conn:
        for index in indexes:
            index.drop(conn)
    index_count = 0
    with engine.connect() as conn:
        _fast_load(conn)
        for first in range(0, versions, chunk):
            with conn.begin():
                index_count += _load(conn, first, min(versions, first + chunk))
    loaded = time.perf_counter()
    with engine.begin() as conn:
        _create(conn, indexes)
        if conn.dialect.name == "postgresql":
            for model in (Dataset, DatasetVersion):
                name = model.__tablename__
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))"
                )
    analyze(engine)
    done = time.perf_counter()
    return Built(
        versions=versions,
        datasets=versions // VERSIONS_PER_DATASET,
        index_rows=index_count,
        seconds=done - start,
        load_seconds=loaded - start,
        index_seconds=done - loaded,
    )


def _load(conn: Connection, first: int, last: int) -> int:
    """Versions first+1 … last and their datasets; returns the index rows written."""
    rng = random.Random(first)  # a chunk's values depend on its place only
    now = datetime(2026, 1, 1, tzinfo=UTC)
    base_ms = int(now.timestamp() * 1000)
    datasets, dataset_index = [], []
    for d in range(first // VERSIONS_PER_DATASET + 1, last // VERSIONS_PER_DATASET + 1):
        props = dataset_properties(rng, d)
        datasets.append(_owner_row(d, new_id(base_ms + d), props, now, name=f"bench-search-{d}"))
        dataset_index.extend(index_rows("dataset", d, props))
    versions, version_index = [], []
    for i in range(first + 1, last + 1):
        props = version_properties(rng, i)
        row = _owner_row(i, new_id(base_ms + i), props, now, name=f"v{i}")
        row.update(
            dataset_id=(i - 1) // VERSIONS_PER_DATASET + 1,
            status="completed",
            spec={},
            completed_at=now,
        )
        versions.append(row)
        version_index.extend(index_rows("version", i, props))
    bulk_insert(conn, _table(Dataset), datasets)
    bulk_insert(conn, _table(DatasetVersion), versions)
    bulk_insert(conn, _table(PropertyIndex), dataset_index)
    bulk_insert(conn, _table(PropertyIndex), version_index)
    return len(dataset_index) + len(version_index)


def _owner_row(key: int, uid: str, props: dict[str, Any], now: datetime, *, name: str) -> dict[str, Any]:
    return {
        "id": key,
        "uid": uid,
        "name": name,
        "properties": props,
        "tags": [],
        "violations": [],
        "created_at": now,
        "updated_at": now,
    }


def _fast_load(conn: Connection) -> None:
    """SQLite: no fsync for the load (a bench store is thrown away if the machine dies)."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("PRAGMA synchronous=OFF")  # outside a transaction, where the pragma works


def _create(conn: Connection, indexes: list[Index]) -> None:
    if conn.dialect.name == "postgresql":
        # What a busy server gives an index build; the default 64 MB sorts 13 M rows on disk.
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '512MB'")
    for index in indexes:
        index.create(conn)


def analyze(engine: Engine) -> None:
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            for model in _BULK:
                auto.execute(text(f"VACUUM ANALYZE {model.__tablename__}"))
        else:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()


def sample_properties(versions: int, owners: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The property sets the generator gave `owners` (version keys), for checks."""
    wanted = set(owners)
    for first in range(0, versions, CHUNK):
        last = min(versions, first + CHUNK)
        if any(first < o <= last for o in wanted):
            yield from ((i, p) for i, p in _chunk_properties(first, last) if i in wanted)


def all_version_properties(versions: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(key, property set) of every version a store of `versions` versions holds, in key order:
    what `build` writes (the peers benchmark loads the same records into MLflow)."""
    for first in range(0, versions, CHUNK):
        yield from _chunk_properties(first, min(versions, first + CHUNK))


def _chunk_properties(first: int, last: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Versions first+1 … last, drawn as `_load` draws them (the datasets' values come first)."""
    rng = random.Random(first)
    for d in range(first // VERSIONS_PER_DATASET + 1, last // VERSIONS_PER_DATASET + 1):
        dataset_properties(rng, d)
    for i in range(first + 1, last + 1):
        yield i, version_properties(rng, i)


def _table(model: type[Base]) -> Table:
    return Base.metadata.tables[model.__tablename__]
