"""Apply throughput: many versions of 100 properties completed at once, applied by 2 workers.

The versions' lines are staged by `Ingestor.ingest` and every version is completed; then two
processes call `apply_target` on their halves of the due targets (the versions and their datasets)
and the clock runs from their common start until both are done. Floor (same run, same database
kind, before and after the applies): the rows those applies write (datasets, versions with their
property sets, one `property_changes` and one `property_index` row per property, watermarks)
inserted in batches through SQLAlchemy Core in one process. Target: ≥ 30% of the floor, on SQLite
and on PostgreSQL.

The version count is fitted to the time box from a 20-version calibration (up to the 10,000 asked).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Engine, insert, select

from worker.applying import apply_target
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.staging import Staging
from worker.store.db import make_engine
from worker.store.index import index_rows
from worker.store.models import Dataset, DatasetVersion, PropertyChange, PropertyIndex, Watermark
from worker.uris import Target

from .common import Context, Row, Section, fit, fmt_rate, new_engine, scaled, table, verdict
from .workload import JSONL, version_line, version_properties, write_lines

ASKED_VERSIONS = 10_000
PROPERTIES = 100
WORKERS = 2
CALIBRATION = 20


def run(ctx: Context) -> Section:
    section = Section("apply")
    for kind in ("sqlite", "postgresql"):
        result = measure(ctx, kind, ctx.box.seconds * 0.2)
        versions, apply_rate, floor_rate = result["versions"], result["apply_vps"], result["floor_vps"]
        section.rows.append(
            Row(
                f"apply throughput ({'SQLite' if kind == 'sqlite' else 'PostgreSQL'})",
                f"{scaled(versions, ASKED_VERSIONS, 'versions')} × {PROPERTIES} properties "
                f"completed at once, {WORKERS} worker processes",
                f"{fmt_rate(apply_rate, 'versions/s')} ({fmt_rate(apply_rate * PROPERTIES, 'properties/s')})",
                fmt_rate(floor_rate, "versions/s"),
                f"{apply_rate / floor_rate:.1%} of floor",
                "≥ 30% of floor",
                verdict(apply_rate >= 0.3 * floor_rate),
            )
        )
        section.data[kind] = result
    return section


def measure(ctx: Context, kind: str, apply_seconds: float) -> dict[str, Any]:
    """Calibrate, stage, complete, apply with 2 processes, then the floor; all on fresh databases."""
    with ctx.database(kind, f"apply_{kind}_cal") as url:
        client, staging = _staging(ctx)
        calibration = CALIBRATION // 2 if ctx.quick else CALIBRATION
        targets = _stage(ctx, staging, calibration, f"cal-{kind}")
        engine = new_engine(url)
        start = time.perf_counter()
        for target in targets:
            apply_target(engine, staging, target)
        single = calibration / (time.perf_counter() - start)
        engine.dispose()
        client.close()
    # Two workers are at best twice as fast as one (SQLite serialises them on its write lock).
    versions = fit(single * (1.0 if kind == "sqlite" else 1.6), apply_seconds, 20, ASKED_VERSIONS)
    if ctx.quick:
        versions = min(versions, 40)
    # The floor runs before and after the applies (the machine is shared): their mean counts.
    floors = [_floor_in(ctx, kind, versions, "before")]
    with ctx.database(kind, f"apply_{kind}") as url:
        new_engine(url).dispose()
        client, staging = _staging(ctx)
        targets = _stage(ctx, staging, versions, f"ds-{kind}")
        seconds = _apply_in_parallel(url, ctx.redis_url, staging.keys.prefix, targets)
        client.close()
    floors.append(_floor_in(ctx, kind, versions, "after"))
    floor_s = sum(floors) / 2
    return {
        "versions": versions,
        "properties": PROPERTIES,
        "apply_seconds": seconds,
        "apply_vps": versions / seconds,
        "floor_seconds": floor_s,
        "floor_vps": versions / floor_s,
        "floor_before_after_vps": [versions / f for f in floors],
        "single_process_calibration_vps": single,
    }


def _floor_in(ctx: Context, kind: str, versions: int, when: str) -> float:
    with ctx.database(kind, f"apply_{kind}_floor_{when}") as url:
        engine = new_engine(url)
        try:
            return _floor(engine, versions)
        finally:
            engine.dispose()


def _staging(ctx: Context) -> tuple[redis.Redis, Staging]:
    client = ctx.redis()
    return client, Staging(client, Keys(ctx.prefix("apply")))


def _versions(count: int, tag: str) -> Iterator[tuple[Target, dict[str, Any]]]:
    rng = random.Random(count)
    datasets = max(1, count // 100)
    for i in range(count):
        yield Target("version", f"bench-{tag}-{i % datasets}", f"v{i}"), version_properties(rng, PROPERTIES)


def _stage(ctx: Context, staging: Staging, count: int, tag: str) -> list[Target]:
    """Stage `count` versions' lines from one file, complete them all; return the due targets."""
    root = ctx.folder(f"apply-root-{staging.keys.prefix}")
    path = root / f"exec-{tag}" / JSONL
    versions = list(_versions(count, tag))
    write_lines(path, (version_line(t.key, props) for t, props in versions))
    Ingestor(root, staging, line_limit=1 << 20).ingest(path)
    due: set[str] = set()
    for target, _ in versions:
        due.update(staging.complete_version(target))
    # Versions first, then datasets: the order Celery would see them completed in.
    return sorted((Target.parse(k) for k in due), key=lambda t: (t.kind != "version", t.key))


def _worker(url: str, redis_url: str, prefix: str, targets: list[str], go: Any, done: Any) -> None:
    """One apply process: its own engine and Redis client; waits for `go`, applies its share."""
    engine = make_engine(url)
    client = redis.Redis.from_url(redis_url)
    staging = Staging(client, Keys(prefix))
    go.wait()
    for key in targets:
        apply_target(engine, staging, Target.parse(key))
    done.put(time.perf_counter())
    engine.dispose()
    client.close()


def _apply_in_parallel(url: str, redis_url: str, prefix: str, targets: list[Target]) -> float:
    """Seconds for 2 processes to apply every target (each takes every other one)."""
    mp = multiprocessing.get_context("fork")
    go, done = mp.Event(), mp.Queue()
    keys = [t.key for t in targets]
    procs = [
        mp.Process(target=_worker, args=(url, redis_url, prefix, keys[i::WORKERS], go, done))
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let both connect and import before the clock starts
    start = time.perf_counter()
    go.set()
    ends = [float(done.get(timeout=1800)) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"an apply process exited with {p.exitcode}")
    return max(ends) - start


def _floor(engine: Engine, count: int) -> float:
    """Seconds to insert every row the applies wrote, in batches of 100 versions, with Core."""
    now = datetime.now(UTC)
    versions = list(_versions(count, "floor"))
    source = {"origin": "sidecar", "execution": "exec-floor", "file": "f", "line": 1, "offset": 0}
    start = time.perf_counter()
    with engine.begin() as conn:
        names = sorted({t.dataset for t, _ in versions})
        conn.execute(
            insert(table(Dataset)),
            [{"name": n, "properties": {}, "created_at": now, "updated_at": now} for n in names],
        )
        ids = dict(conn.execute(select(Dataset.name, Dataset.id)).tuples().all())
    for batch in range(0, count, 100):
        chunk = versions[batch : batch + 100]
        with engine.begin() as conn:
            rows = [
                {
                    "dataset_id": ids[t.dataset],
                    "name": t.version,
                    "status": "completed",
                    "properties": props,
                    "created_at": now,
                    "updated_at": now,
                    "completed_at": now,
                }
                for t, props in chunk
            ]
            conn.execute(insert(table(DatasetVersion)), rows)
            version_ids = dict(
                conn.execute(
                    select(DatasetVersion.name, DatasetVersion.id).where(
                        DatasetVersion.name.in_([t.version for t, _ in chunk])
                    )
                )
                .tuples()
                .all()
            )
            changes, index = [], []
            for t, props in chunk:
                owner = version_ids[t.version]
                changes += [
                    {
                        "owner_kind": "version",
                        "owner_id": owner,
                        "key": k,
                        "old": None,
                        "new": v,
                        "source": source,
                        "changed_at": now,
                        "made_by": "exec-floor",
                    }
                    for k, v in props.items()
                ]
                index += index_rows("version", owner, props)  # the apply's own rows
            conn.execute(insert(table(PropertyChange)), changes)
            conn.execute(insert(table(PropertyIndex)), index)
            conn.execute(
                insert(table(Watermark)),
                [{"target": t.key, "stream_id": "0-1", "applied_at": now} for t, _ in chunk],
            )
    return time.perf_counter() - start
