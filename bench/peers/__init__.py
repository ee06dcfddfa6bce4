"""Pages against MLflow (issue 16, item 5): `bench/run.py --peers` or `make bench PEERS=1`.

The same records on both sides: `versions` version property sets from the search store's
generator (`bench.searchstore.all_version_properties`: 10 properties each, `camera` a nested
object of two, `audit` on 0.1 %), 100,000 in a full run, 20,000 in a quick one.

* MLflow 3.17 (`mlflow-skinny`, in its own virtualenv `bench/peers/.venv-mlflow`, made once:
  `venv.py`) gets them as a JSON Lines file; `mlflow_runner.py`, run by that virtualenv's
  python, makes a SQLite tracking store, loads one run per record through MLflow's own
  SQLAlchemy models (numbers as metrics, strings and booleans as params) and times
  `MlflowClient().search_runs(experiment_ids=[...], filter_string=..., max_results=1000)` in
  process (no HTTP on its side: in its favour).
* The sidecar gets them through `bench.searchstore.build` (the production schema and bulk path),
  on SQLite and on PostgreSQL, and a real `sidecar serve` (uvicorn, as deployed) answers
  `GET /api/v0/dataset-versions/?limit=1000&filter=...`: the first page of 1,000 versions with
  its count, read whole over HTTP by an httpx client.

Both sides run one after the other, never at once (2 cores), MLflow first. Each query: one
warm-up call, then at least 5 and at most 20 timed calls within its share of the box. Before
timing, the page lengths are checked against the matches counted in the generated records, so
both sides are seen to answer the same question over the same data.

Target (per filter and database): our p50 ≤ 10 % of MLflow's p50 in the same run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from worker.settings import Settings
from worker.store.db import make_engine

from .. import searchstore
from ..common import Context, Row, Section, fmt_int, fmt_lat, fmt_ms, summary, verdict
from ..procs import Child, child_env
from . import venv

PAGE = 1000
ASKED_VERSIONS = 100_000
QUICK_VERSIONS = 20_000
TARGET = 0.10  # of MLflow's p50
RUNNER = Path(__file__).resolve().parent / "mlflow_runner.py"
DATABASES = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Query:
    name: str
    ours: str  # the sidecar's filter language ("" for none)
    mlflow: str  # MLflow's search filter for the same question
    matches: Callable[[dict[str, Any]], bool]  # the same question over a generated property set


QUERIES = (
    Query("no filter", "", "", lambda p: True),
    Query(
        "equality",
        'machine = "press-04"',
        "params.machine = 'press-04'",
        lambda p: p["machine"] == "press-04",
    ),
    Query(
        "numeric range",
        "sample_count > 8500",
        "metrics.sample_count > 8500",
        lambda p: p["sample_count"] > 8500,
    ),
    Query(
        "and of two",
        'defect_rate < 0.001 and shift = "night"',
        "metrics.defect_rate < 0.001 and params.shift = 'night'",
        lambda p: p["defect_rate"] < 0.001 and p["shift"] == "night",
    ),
    Query(
        "prefix like",
        'preprocessing_version like "3.%"',
        "params.preprocessing_version LIKE '3.%'",
        lambda p: p["preprocessing_version"].startswith("3."),
    ),
)


def run(ctx: Context) -> Section:
    section = Section("peers")
    versions = QUICK_VERSIONS if ctx.quick else ASKED_VERSIONS
    began = time.perf_counter()
    python = venv.ensure(ctx.workdir / "mlflow-venv.log")
    section.data["venv_seconds"] = time.perf_counter() - began
    section.data["venv"] = venv.versions()
    records = ctx.workdir / "peers-records.jsonl"
    expected = _write_records(records, versions)
    section.data.update(versions=versions, expected=expected)

    mlflow = _mlflow(ctx, python, records, per_query=max(3.0, ctx.box.left() * 0.25 / len(QUERIES)))
    section.data["mlflow"] = mlflow
    by_name = {q["name"]: q for q in mlflow["queries"]}
    for query in QUERIES:
        got, want = by_name[query.name]["returned"], min(PAGE, expected[query.name])
        if got != want:
            raise AssertionError(f"MLflow's page for {query.name!r} has {got} runs, the records {want}")

    ours: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(DATABASES):
        per_query = max(2.0, ctx.box.left() * 0.5 / (len(DATABASES) - i) / len(QUERIES) - 1)
        ours[kind] = _ours(ctx, kind, versions, expected, per_query)
    section.data["ours"] = ours

    load = mlflow["load"]
    section.notes.append(
        f"peers: {fmt_int(versions)} records of 10 properties; MLflow {section.data['venv']['mlflow']} "
        f"(SQLAlchemy {section.data['venv']['sqlalchemy']}) loaded {fmt_int(load['runs'])} runs "
        f"({fmt_int(load['params'])} params, {fmt_int(load['metrics'])} metrics) through its models in "
        f"{load['seconds']:.1f} s; our store built in "
        + ", ".join(f"{ours[k]['build']['seconds']:.1f} s ({_db_name(k)})" for k in DATABASES)
    )
    for kind in DATABASES:
        for query in QUERIES:
            section.rows.append(
                _row(kind, query, versions, expected[query.name], ours[kind], by_name[query.name])
            )
    return section


def _row(
    kind: str, query: Query, versions: int, matches: int, ours: dict[str, Any], theirs: dict[str, Any]
) -> Row:
    stats = ours["queries"][query.name]["stats"]
    mlflow = summary(theirs["seconds"])
    share = stats["p50_ms"] / mlflow["p50_ms"]
    ours_filter = f"`{query.ours}`" if query.ours else "no filter"
    mlflow_filter = f"`{query.mlflow}`" if query.mlflow else "no filter"
    return Row(
        f"page of 1,000 vs MLflow ({_db_name(kind)}): {query.name}",
        f"{ours_filter}: {fmt_int(matches)} of {fmt_int(versions)} versions; first page of "
        f"{fmt_int(PAGE)} with its count over HTTP (`sidecar serve`); MLflow: `search_runs` "
        f"({mlflow_filter}, max_results=1000) on SQLite, in process",
        fmt_lat(stats),
        f"MLflow p50 {fmt_ms(mlflow['p50_ms'])} · p99 {fmt_ms(mlflow['p99_ms'])}",
        f"{share * 100:.1f}% of MLflow",
        f"p50 ≤ {TARGET * 100:.0f}% of MLflow",
        verdict(share <= TARGET),
    )


def _db_name(kind: str) -> str:
    return "PostgreSQL" if kind == "postgresql" else "SQLite"


def _write_records(path: Path, versions: int) -> dict[str, int]:
    """The store's records as JSON Lines for MLflow; the matches of every query among them."""
    expected = {q.name: 0 for q in QUERIES}
    with open(path, "w") as f:
        for i, properties in searchstore.all_version_properties(versions):
            f.write(json.dumps({"i": i, "properties": properties}) + "\n")
            for q in QUERIES:
                expected[q.name] += q.matches(properties)
    return expected


def _mlflow(ctx: Context, python: Path, records: Path, per_query: float) -> dict[str, Any]:
    queries = ctx.workdir / "peers-queries.json"
    queries.write_text(json.dumps([{"name": q.name, "filter": q.mlflow} for q in QUERIES]))
    out = ctx.workdir / "peers-mlflow.json"
    db = ctx.folder("peers-mlflow") / "mlflow.db"
    db.unlink(missing_ok=True)
    args = [str(python), str(RUNNER), "--records", str(records), "--db", str(db), "--queries", str(queries)]
    args += ["--out", str(out), "--max-results", str(PAGE), "--seconds", f"{per_query:.1f}"]
    with open(ctx.workdir / "peers-mlflow.log", "wb") as log:
        proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        tail = (ctx.workdir / "peers-mlflow.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow_runner.py exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _ours(
    ctx: Context, kind: str, versions: int, expected: dict[str, int], per_query: float
) -> dict[str, Any]:
    """Build the store, serve it with `sidecar serve`, time each query's first page over HTTP."""
    out: dict[str, Any] = {"queries": {}}
    with ctx.database(kind, "peers") as url:
        engine = make_engine(url)
        try:
            out["build"] = searchstore.build(engine, versions).__dict__
        finally:
            engine.dispose()
        port = _free_port()
        settings = Settings(
            data_dir=ctx.folder(f"peers-{kind}-data"),
            database_url=url,
            redis_url=ctx.redis_url,
            redis_prefix=ctx.prefix(f"peers-{kind}"),
            port=port,
            log_level="WARNING",
        )
        server = Child(["serve"], child_env(settings), ctx.workdir / f"peers-serve-{kind}.log")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                server.wait_for(lambda: _healthy(client), timeout=90, what="sidecar serve")
                for query in QUERIES:
                    samples, page = _time_page(client, query, per_query)
                    want = min(PAGE, expected[query.name])
                    if len(page["results"]) != want:
                        raise AssertionError(
                            f"{_db_name(kind)} page for {query.name!r} has {len(page['results'])} "
                            f"versions, the records {want}"
                        )
                    out["queries"][query.name] = {
                        "filter": query.ours,
                        "count": page["count"],
                        "count_exact": page["count_exact"],
                        "stats": summary(samples),
                        "ms": [s * 1000 for s in samples],
                    }
        finally:
            server.stop()
    return out


def _time_page(client: httpx.Client, query: Query, seconds: float) -> tuple[list[float], dict[str, Any]]:
    """One warm-up request, then 5 to 20 within `seconds`: each until its body is read whole."""
    params = {"limit": str(PAGE)}
    if query.ours:
        params["filter"] = query.ours
    samples: list[float] = []
    page: dict[str, Any] = {}
    began = time.perf_counter()
    for n in range(21):
        if n > 5 and time.perf_counter() - began > seconds:
            break
        start = time.perf_counter()
        answer = client.get("/api/v0/dataset-versions/", params=params)
        body = answer.read()
        elapsed = time.perf_counter() - start
        if answer.status_code != 200:
            raise RuntimeError(f"{query.name}: HTTP {answer.status_code}: {body[:300]!r}")
        if n:
            samples.append(elapsed)
        else:
            page = answer.json()
    return samples, page


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
