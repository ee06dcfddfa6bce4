"""Search: one page of `list_version_ids` (the API's list) over 1,000,000 versions, PostgreSQL and SQLite.

The store is `bench/searchstore.py`: the production schema (the migrations), rows bulk loaded
through `worker.store.index.bulk_insert` and index rows made by the production `index_rows`;
100,000 datasets and 1,000,000 versions of ~11 properties (13 index rows each). It is built at
the full size on both databases whatever the box (~165 s each on this machine).

Each filter kind runs through the real query layer as the API calls it: the count (capped at
10,000, `count_exact`) and the first page of 100, in id order or ordered by a property.
Targets: p50 ≤ 50 ms and p99 ≤ 200 ms on PostgreSQL, p50 ≤ 100 ms on SQLite; ordered by a
property on a non-selective filter, p50 ≤ 200 ms. Floor (PostgreSQL, one run each): the same
query with the property_index indexes dropped.

Also over the PostgreSQL store: a facet of one key over every version (`store.facets`, target
p50 ≤ 200 ms), the keys of every version, and `sidecar export --versions` of every version to
/dev/null in a child process whose peak RSS is compared with the same command exporting nothing
(target: at most 100 MB more, whatever the number of rows).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from worker.query import Key
from worker.store import facets
from worker.store.db import make_engine
from worker.store.models import PropertyIndex
from worker.store.queries import Listed, ListQuery, list_version_ids

from . import searchstore
from .common import Context, Row, Section, fmt_int, fmt_lat, fmt_ms, summary, table, verdict

ASKED_VERSIONS = 1_000_000


def queries(versions: int) -> list[tuple[str, str, str | None, bool]]:
    """(name, filter, ordering, selective) over a store of `versions` versions."""
    probe = versions // 2
    return [
        ("equality", f'run_id = "run-{probe:07d}"', None, True),
        ("numeric threshold", "score > 0.9999", None, True),
        ("nested key", f'camera.serial = "SN-{probe:07d}"', None, True),
        ("and of two", 'shift = "night" and score > 0.999', None, True),
        ("exists", "exists audit", None, True),
        ("non-selective equality", 'split = "train"', None, False),
        ("non-selective range", "sample_count > 8500", None, False),
        ("prefix like", 'preprocessing_version like "3.%"', None, False),
        ("prefix ilike", 'preprocessing_version ilike "3.%"', None, False),
        ("in", 'split in ("train", "val")', None, False),
        ("or", 'split = "train" or shift = "day"', None, False),
        ("not", "not exists audit", None, False),
        ("and of two non-selective", 'defect_rate < 0.001 and shift = "night"', None, False),
        ("ordered by a number", 'split = "train"', "score", False),
        ("ordered by a string, descending", 'split = "train"', "-machine", False),
    ]


def run(ctx: Context) -> Section:
    section = Section("search")
    versions = 20_000 if ctx.quick else ASKED_VERSIONS
    results: dict[str, Any] = {}
    for kind in ("postgresql", "sqlite"):
        with ctx.database(kind, "search") as url:
            engine = make_engine(url)
            try:
                built = searchstore.build(engine, versions)
                section.data[f"build_{kind}"] = built.__dict__
                results.update(_measure_all(ctx, engine, versions, kind))
                if kind == "postgresql":
                    results.update(_measure_facets(ctx, engine, versions, 5.0))
                    results.update(_measure_export(url, versions))
                    results.update(_measure_floors(engine, versions))
            finally:
                engine.dispose()
    section.data["versions"] = versions
    section.data["queries"] = results
    pg, lite = section.data["build_postgresql"], section.data["build_sqlite"]
    section.notes.append(
        f"search store: {fmt_int(versions // 10)} datasets and {fmt_int(versions)} versions "
        f"({fmt_int(pg['index_rows'])} index rows) through the production schema; built in "
        f"{pg['seconds']:.0f} s on PostgreSQL, {lite['seconds']:.0f} s on SQLite"
    )
    _rows(section, results, versions)
    return section


def _rows(section: Section, results: dict[str, Any], versions: int) -> None:
    for name, result in results.items():
        if result["selective"] == "export":
            grown = result["rss_mb"] - result["floor_mb"]
            section.rows.append(
                Row(
                    f"search: {name}",
                    f"`sidecar export --versions` of all {fmt_int(versions)} versions to /dev/null; peak RSS",
                    f"{result['rss_mb']:.0f} MB ({fmt_int(int(result['rows_per_s']))} rows/s)",
                    f"exporting nothing: {result['floor_mb']:.0f} MB",
                    f"+{grown:.0f} MB",
                    "+≤ 100 MB (constant memory)",
                    verdict(grown <= 100),
                )
            )
            continue
        stats = result["indexed"]
        if result["selective"] is None:  # a facet or the keys: no floor without the indexes
            target = 200 if name.startswith("facet") else None
            section.rows.append(
                Row(
                    f"search: {name}",
                    f"over all {fmt_int(versions)} versions, no filter (`store.facets`, as the API calls it)",
                    fmt_lat(stats),
                    "—",
                    "—",
                    f"p50 ≤ {target} ms" if target else "—",
                    verdict(stats["p50_ms"] <= target) if target else "info",
                )
            )
            continue
        if result["selective"] == "floor":
            continue
        postgres = result["database"] == "postgresql"
        ordered = result["ordering"] is not None
        p50_target = 200 if ordered else (50 if postgres else 100)
        ok = stats["p50_ms"] <= p50_target and (not postgres or ordered or stats["p99_ms"] <= 200)
        aim = f"p50 ≤ {p50_target} ms" + (", p99 ≤ 200 ms" if postgres and not ordered else "")
        floor = results.get(f"floor: {result['name']}")
        floor_text, ratio = "—", "—"
        if floor is not None and postgres:
            floor_text = f"no indexes: {fmt_ms(floor['indexed']['p50_ms'])}"
            ratio = f"{floor['indexed']['p50_ms'] / stats['p50_ms']:.0f}× faster with indexes"
        count = fmt_int(result["count"]) + ("" if result["count_exact"] else "+ (capped)")
        order = f", ordered by `{result['ordering']}`" if ordered else ""
        section.rows.append(
            Row(
                f"search ({'PostgreSQL' if postgres else 'SQLite'}): {result['name']}",
                f"`{result['filter']}`{order}: {count} of {fmt_int(versions)} versions; count + page of 100",
                fmt_lat(stats),
                floor_text,
                ratio,
                aim,
                verdict(ok),
            )
        )


def _measure_all(ctx: Context, engine: Engine, versions: int, kind: str) -> dict[str, Any]:
    """Each query 30 times after a warm-up run, within its share of the box."""
    results: dict[str, Any] = {}
    plan = queries(versions)
    per_query = max(1.0, ctx.box.left() * 0.25 / len(plan))
    for name, filter_text, ordering, selective in plan:
        samples, listed = _time_query(engine, filter_text, ordering, 5, 30, per_query)
        results[f"{kind}: {name}"] = {
            "name": name,
            "database": kind,
            "filter": filter_text,
            "ordering": ordering,
            "selective": selective,
            "count": listed.count,
            "count_exact": listed.count_exact,
            "indexed": summary(samples),
            "indexed_ms": [s * 1000 for s in samples],
        }
    return results


def _measure_floors(engine: Engine, versions: int) -> dict[str, Any]:
    """The floor: each query once with the property_index indexes dropped (PostgreSQL)."""
    with engine.begin() as conn:
        for index in table(PropertyIndex).indexes:
            index.drop(conn)
    searchstore.analyze(engine)
    out: dict[str, Any] = {}
    for name, filter_text, ordering, _ in queries(versions)[:6]:
        samples, listed = _time_query(engine, filter_text, ordering, 1, 1, 0.0)
        out[f"floor: {name}"] = {"selective": "floor", "indexed": summary(samples), "count": listed.count}
    return out


FACETS = [("string", "split"), ("number", "score"), ("boolean", "reviewed"), ("nested number", "camera.fps")]


def _measure_facets(ctx: Context, engine: Engine, versions: int, seconds: float) -> dict[str, Any]:
    """A facet of one key over every version (no filter), through `store.facets` as the API
    calls it; and the keys of the whole set. Floor: none (reported against the target)."""

    def facet(key: Key) -> None:
        with Session(engine) as session:
            facets.facets(session, "version", None, [key])

    def keys() -> None:
        with Session(engine) as session:
            facets.key_counts(session, "version", None)

    out: dict[str, Any] = {}
    for label, key in FACETS:
        parsed = Key(tuple(key.split(".")))
        samples = _time(lambda k=parsed: facet(k), 3, 20, seconds)
        out[f"facet: {label}"] = {
            "filter": key,
            "selective": None,
            "count": versions,
            "indexed": summary(samples),
        }
    out["keys of every version"] = {
        "filter": "keys",
        "selective": None,
        "count": versions,
        "indexed": summary(_time(keys, 1, 5, seconds)),
    }
    return out


# A child process that runs `sidecar export` and prints its own peak RSS (KiB) when done.
_EXPORT_CHILD = """
import resource, sys
from worker.cli import main
code = main(sys.argv[1:])
print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _measure_export(url: str, versions: int) -> dict[str, Any]:
    """`sidecar export --versions` of every version to /dev/null (JSON Lines and Parquet), peak
    RSS against the same command exporting nothing (the floor: the process itself)."""
    out: dict[str, Any] = {}
    env = {**os.environ, "SIDECAR_DATABASE_URL": url}
    floor = _export_rss(env, ["--filter", 'run_id = "none"', "--format", "jsonl"])
    for fmt in ("jsonl", "parquet"):
        start = time.perf_counter()
        peak = _export_rss(env, ["--format", fmt])
        seconds = time.perf_counter() - start
        out[f"export {fmt}"] = {
            "filter": "",
            "selective": "export",
            "count": versions,
            "rss_mb": peak / 1024,
            "floor_mb": floor / 1024,
            "rows_per_s": versions / seconds,
        }
    return out


def _export_rss(env: dict[str, str], args: list[str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", _EXPORT_CHILD, "export", "--versions", "-o", os.devnull, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.rsplit("maxrss", 1)[1].split()[0])


def _time(call: Any, low: int, high: int, seconds: float) -> list[float]:
    samples: list[float] = []
    began = time.perf_counter()
    for i in range(high + 1):
        if i > low and time.perf_counter() - began > seconds:
            break
        start = time.perf_counter()
        call()
        if i:
            samples.append(time.perf_counter() - start)
    return samples


def _time_query(
    engine: Engine, filter_text: str, ordering: str | None, low: int, high: int, seconds: float
) -> tuple[list[float], Listed]:
    """Run times after one warm-up run (at least `low`, at most `high`, within `seconds`), and the
    last page read."""
    samples: list[float] = []
    listed = Listed(0, True, [], False)
    began = time.perf_counter()
    ask = ListQuery(filter=filter_text, ordering=ordering, limit=100, exact_count=False)
    for i in range(high + 1):
        if i > low and time.perf_counter() - began > seconds:
            break
        with Session(engine) as session:
            start = time.perf_counter()
            listed = list_version_ids(session, ask)
            elapsed = time.perf_counter() - start
        if i:
            samples.append(elapsed)
    return samples, listed
