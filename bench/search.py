"""Search: `list_versions(session, ListQuery(filter=...))` on PostgreSQL over many datasets and versions.

The store is generated inside PostgreSQL straight into the tables the sidecar uses (`datasets`,
`dataset_versions` with their property sets, `property_index` rows exactly as
`worker.store.index.flatten` makes them, checked): ~10 properties per version (12 index rows, one
nested object), 1 dataset of 10 properties per 10 versions. The size is fitted to the time box
(up to the 1,000,000 versions asked), building in chunks of 25,000.

Each query runs through the real query layer: the count and the first page of 100 (as the API
answers it). Floor: the same query with the property_index indexes dropped; the speed-up is
reported. Target: p50 ≤ 50 ms for a selective filter.

Also over the same store: a facet of one key over every version (`store.facets`, target p50 ≤
200 ms), the keys of every version, and `sidecar export --versions` of every version to
/dev/null in a child process whose peak RSS is compared with the same command exporting nothing
(target: at most 100 MB more, whatever the number of rows).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from worker.query import Key
from worker.store import facets
from worker.store.index import STR_KEY_LENGTH, flatten
from worker.store.models import PropertyIndex
from worker.store.queries import ListQuery, list_versions

from .common import Context, Row, Section, fmt_int, fmt_lat, fmt_ms, new_engine, summary, table, verdict

ASKED_VERSIONS = 1_000_000
CHUNK = 25_000
INDEX_COST = 0.7  # building the indexes takes about this share of the insert time again


def queries(versions: int) -> list[tuple[str, str, bool]]:
    """(name, filter, selective) over a store of `versions` versions."""
    probe = versions // 2
    return [
        ("equality", f'run_id = "run-{probe:07d}"', True),
        ("numeric threshold", "score > 0.9999", True),
        ("nested key", f'camera.serial = "SN-{probe:07d}"', True),
        ("and of two", 'shift = "night" and score > 0.999', True),
        ("exists", "exists audit", True),
        ("non-selective", 'split = "train"', False),
    ]


def run(ctx: Context) -> Section:
    section = Section("search")
    with ctx.postgres("search") as url:
        engine = new_engine(url)
        try:
            build_budget = ctx.box.seconds * (0.2 if ctx.quick else 0.6)
            versions, build_s = build(engine, build_budget, 10_000 if ctx.quick else ASKED_VERSIONS)
            section.data["versions"] = versions
            section.data["datasets"] = versions // 10
            section.data["build_seconds"] = build_s
            with engine.connect() as conn:
                section.data["index_rows"] = conn.execute(
                    text("SELECT count(*) FROM property_index")
                ).scalar()
            results = _measure_all(ctx, engine, versions)
            results.update(_measure_export(url, versions))
        finally:
            engine.dispose()
    section.data["queries"] = results
    scaled_note = "" if versions >= ASKED_VERSIONS else ", scaled down from 1,000,000 to fit the time box"
    section.notes.append(
        f"search store: {fmt_int(versions // 10)} datasets and {fmt_int(versions)} versions "
        f"({fmt_int(section.data['index_rows'])} index rows){scaled_note}; built in {build_s:.0f} s"
    )
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
        bare = result["no_index"]
        speedup = bare["p50_ms"] / stats["p50_ms"]
        selective = result["selective"]
        section.rows.append(
            Row(
                f"search: {name}",
                f"`{result['filter']}`: {fmt_int(result['count'])} of {fmt_int(versions)} versions match"
                f"{scaled_note and ' (store scaled down)'}; count + first page",
                fmt_lat(stats),
                f"no indexes: p50 {fmt_ms(bare['p50_ms'])}",
                f"{speedup:.1f}× faster with indexes",
                "p50 ≤ 50 ms" if selective else "—",
                verdict(stats["p50_ms"] <= 50) if selective else "info",
            )
        )
    return section


def _measure_all(ctx: Context, engine: Engine, versions: int) -> dict[str, Any]:
    """Each query with the indexes (up to 30 runs), then with them dropped (up to 3), in the box."""
    results: dict[str, Any] = {}
    plan = queries(versions)
    per_query = max(1.0, ctx.box.left() * 0.5 / len(plan))
    for name, filter_text, selective in plan:
        samples, count = _time_query(engine, filter_text, 3, 30, per_query)
        results[name] = {
            "filter": filter_text,
            "selective": selective,
            "count": count,
            "indexed": summary(samples),
            "indexed_ms": [s * 1000 for s in samples],
        }
    results.update(_measure_facets(ctx, engine, versions, per_query))
    with engine.begin() as conn:
        for index in table(PropertyIndex).indexes:
            index.drop(conn)
    _analyze(engine)
    per_query = max(1.0, ctx.box.left() / len(plan))
    for name, filter_text, _ in plan:
        samples, _count = _time_query(engine, filter_text, 1, 3, per_query)
        results[name]["no_index"] = summary(samples)
    return results


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
    engine: Engine, filter_text: str, low: int, high: int, seconds: float
) -> tuple[list[float], int]:
    """Run times after one warm-up run (at least `low`, at most `high`, within `seconds`), and the
    match count."""
    samples: list[float] = []
    count = 0
    began = time.perf_counter()
    for i in range(high + 1):
        if i > low and time.perf_counter() - began > seconds:
            break
        with Session(engine) as session:
            start = time.perf_counter()
            count, _rows = list_versions(session, ListQuery(filter=filter_text, limit=100))
            elapsed = time.perf_counter() - start
        if i:
            samples.append(elapsed)
    return samples, count


# -- building the store -----------------------------------------------------------------------------
#
# Generated inside PostgreSQL (generate_series, then the index rows derived from the stored JSON
# the way `worker.store.index.flatten` derives them: a row per key, and per key of a nested
# object). `_check_index` compares a few owners' rows with `flatten` itself.

_DATASETS = """
INSERT INTO datasets (id, uid, name, tags, properties, created_at, updated_at)
SELECT d, gen_random_uuid()::text, 'bench-search-' || d, '[]'::jsonb, jsonb_build_object(
    'domain', 'domain-' || (d % 10), 'owner', 'owner-' || (d % 50),
    'project_code', 'prj-' || lpad(d::text, 6, '0'), 'retention_days', (ARRAY[30, 90, 365])[1 + d % 3],
    'material', 'stainless-steel-304', 'region', (ARRAY['eu', 'us', 'ap'])[1 + d % 3],
    'active', random() < 0.8, 'budget', floor(random() * 100000)::int, 'cost_center', 'cc-' || (d % 100),
    'description', 'Press line surface inspection images'), now(), now()
FROM generate_series(:first / 10 + 1, :last / 10) d
"""
_VERSIONS = """
INSERT INTO dataset_versions
  (id, uid, dataset_id, name, status, tags, spec, properties, created_at, updated_at, completed_at)
SELECT i, gen_random_uuid()::text, (i - 1) / 10 + 1, 'v' || i, 'completed', '[]'::jsonb, '{}'::jsonb,
  jsonb_build_object(
    'run_id', 'run-' || lpad(i::text, 7, '0'), 'score', random(),
    'sample_count', floor(random() * 100000)::int,
    'shift', (ARRAY['night', 'day', 'evening'])[1 + floor(random() * 3)::int],
    'split', (ARRAY['train', 'val', 'test'])[1 + floor(random() * 3)::int],
    'reviewed', random() < 0.5,
    'camera', jsonb_build_object(
        'fps', 10 + floor(random() * 51)::int, 'serial', 'SN-' || lpad(i::text, 7, '0')),
    'annotator', 'annotator-' || lpad(floor(random() * 50)::int::text, 2, '0'),
    'defect_rate', random() / 10)
  || CASE WHEN random() < 0.001 THEN '{"audit": "passed"}'::jsonb ELSE '{}'::jsonb END,
  now(), now(), now()
FROM generate_series(:first + 1, :last) i
"""
_INDEX = """
INSERT INTO property_index (owner_kind, owner_id, path, vtype, num, str_key, str_value, str_lower, bool_value)
SELECT :kind, o.id, p.path, jsonb_typeof(p.value),
  CASE WHEN jsonb_typeof(p.value) = 'number' THEN (p.value #>> '{}')::float8 END,
  CASE WHEN jsonb_typeof(p.value) = 'string' THEN left(p.value #>> '{}', :str_key) END,
  CASE WHEN jsonb_typeof(p.value) = 'string' THEN p.value #>> '{}' END,
  CASE WHEN jsonb_typeof(p.value) = 'string' THEN lower(p.value #>> '{}') END,
  CASE WHEN jsonb_typeof(p.value) = 'boolean' THEN (p.value #>> '{}')::boolean END
FROM {table} o, LATERAL (
  SELECT '["' || e.key || '"]' AS path, e.value FROM jsonb_each(o.properties) e
  UNION ALL
  SELECT '["' || e.key || '","' || n.key || '"]', n.value
  FROM jsonb_each(o.properties) e,
       jsonb_each(CASE WHEN jsonb_typeof(e.value) = 'object' THEN e.value ELSE '{}'::jsonb END) n
) p
WHERE o.id BETWEEN :low AND :high
"""


def build(engine: Engine, seconds: float, asked: int) -> tuple[int, float]:
    """Add chunks of versions while the next chunk and the index build still fit in `seconds`;
    then build the property_index indexes (as the models define them) and analyze.

    Returns (versions, seconds). The index build is estimated at INDEX_COST × the insert time."""
    start = time.perf_counter()
    with engine.begin() as conn:
        for index in table(PropertyIndex).indexes:
            index.drop(conn)
        conn.execute(text("SELECT setseed(0.5)"))
    done, insert_s = 0, 0.0
    chunk = min(CHUNK, asked)
    while done < asked:
        began = time.perf_counter()
        first, last = done, done + chunk
        with engine.begin() as conn:
            conn.execute(text(_DATASETS), {"first": first, "last": last})
            conn.execute(text(_VERSIONS), {"first": first, "last": last})
            for kind, owners, low, high in (
                ("dataset", "datasets", first // 10 + 1, last // 10),
                ("version", "dataset_versions", first + 1, last),
            ):
                params = {"kind": kind, "low": low, "high": high, "str_key": STR_KEY_LENGTH}
                conn.execute(text(_INDEX.replace("{table}", owners)), params)
        done = last
        insert_s += time.perf_counter() - began
        per_chunk = insert_s * chunk / done
        if (time.perf_counter() - start) + per_chunk + (insert_s + per_chunk) * INDEX_COST > seconds:
            break
    with engine.begin() as conn:
        for owners in ("datasets", "dataset_versions"):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{owners}', 'id'), (SELECT max(id) FROM {owners}))"
                )
            )
        for index in table(PropertyIndex).indexes:
            index.create(conn)
    _analyze(engine)
    _check_index(engine, [1, done // 2, done])
    return done, time.perf_counter() - start


def _check_index(engine: Engine, owners: list[int]) -> None:
    """The generated index rows of a few versions are exactly what `flatten` makes of them."""
    with engine.connect() as conn:
        for owner in owners:
            props = conn.execute(
                text("SELECT properties FROM dataset_versions WHERE id = :i"), {"i": owner}
            ).scalar()
            rows = conn.execute(
                text(
                    "SELECT path, vtype, num, str_value, bool_value FROM property_index "
                    "WHERE owner_kind = 'version' AND owner_id = :i"
                ),
                {"i": owner},
            ).all()
            index_rows = flatten(props or {})
            expected = sorted((r.path, r.vtype, r.num, r.str_value, r.bool_value) for r in index_rows)
            if sorted(tuple(r) for r in rows) != expected:
                raise AssertionError(f"generated index rows of version {owner} differ from flatten()")


def _analyze(engine: Engine) -> None:
    with engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        for name in ("datasets", "dataset_versions", "property_index"):
            auto.execute(text(f"VACUUM ANALYZE {name}"))
