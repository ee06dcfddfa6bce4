"""The MLflow side of `bench/peers`: run INSIDE `bench/peers/.venv-mlflow` (see `venv.py`), never
imported by the bench itself (it needs MLflow; it imports nothing of the sidecar's).

    .venv-mlflow/bin/python mlflow_runner.py --records R.jsonl --db D.db --queries Q.json --out O.json

1. Makes an MLflow tracking store on SQLite at `--db` the way MLflow makes one
   (`SqlAlchemyStore`: its schema through its own Alembic migrations) and one experiment.
2. Loads one run per record of `--records` (JSON Lines `{"i": <n>, "properties": {...}}`) in
   batches of `BATCH` runs through MLflow's own SQLAlchemy models (`SqlRun`, `SqlParam`,
   `SqlMetric`, `SqlLatestMetric`, `SqlTag`), with ORM bulk inserts, one transaction per batch.
   A record's properties, nested objects flattened with dots (`camera.fps`), become:
   * numbers (not booleans): metrics, one point at step 0, in `metrics` and `latest_metrics`
     (search filters on `metrics.*` read `latest_metrics`, as `log_metric` keeps it);
   * strings and booleans: params (`str(value)`, as `log_param` stores them: `True`, `False`).
   Each run is FINISHED, named `v<i>` (and tagged `mlflow.runName`, as `create_run` tags it),
   with `start_time` growing with `i`.
3. Times `MlflowClient().search_runs(experiment_ids=[...], filter_string=..., max_results=...)`
   for every query of `--queries` (`[{"name": ..., "filter": ...}]`, MLflow's filter syntax),
   in process, after one warm-up call: at least `--min-runs`, at most `--max-runs` calls, within
   `--seconds` per query.

Writes `--out`: the load's figures and, per query, every call's seconds and the page's length.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import LifecycleStage, RunStatus, SourceType
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from sqlalchemy import insert
from sqlalchemy.orm import Session

BATCH = 5_000  # runs per transaction
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the bench store's time


def flatten(properties: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in properties.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        for line in f:
            record = json.loads(line)
            yield record["i"], record["properties"]


def load(store: Any, experiment_id: str, path: Path) -> dict[str, Any]:
    """One run per record, through the models, `BATCH` runs per transaction."""
    counts: dict[str, Any] = {"runs": 0, "params": 0, "metrics": 0, "tags": 0}
    start = time.perf_counter()
    batch: list[tuple[int, dict[str, Any]]] = []
    for record in records(path):
        batch.append(record)
        if len(batch) >= BATCH:
            _insert(store, int(experiment_id), batch, counts)
            batch = []
    if batch:
        _insert(store, int(experiment_id), batch, counts)
    counts["seconds"] = time.perf_counter() - start
    return counts


def _insert(
    store: Any, experiment_id: int, batch: list[tuple[int, dict[str, Any]]], counts: dict[str, Any]
) -> None:
    runs, params, metrics, tags = [], [], [], []
    for i, properties in batch:
        run_uuid = uuid.UUID(int=i).hex  # stable across runs of the bench
        started = START_MS + i
        runs.append(
            {
                "run_uuid": run_uuid,
                "name": f"v{i}",
                "source_type": SourceType.to_string(SourceType.LOCAL),
                "source_name": "bench",
                "entry_point_name": "",
                "user_id": "bench",
                "status": RunStatus.to_string(RunStatus.FINISHED),
                "start_time": started,
                "end_time": started + 1000,
                "source_version": "",
                "lifecycle_stage": LifecycleStage.ACTIVE,
                "artifact_uri": f"mlflow-artifacts:/{experiment_id}/{run_uuid}/artifacts",
                "experiment_id": experiment_id,
            }
        )
        tags.append({"key": "mlflow.runName", "value": f"v{i}", "run_uuid": run_uuid})
        for key, value in flatten(properties):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                point = {
                    "key": key,
                    "value": float(value),
                    "timestamp": started,
                    "step": 0,
                    "is_nan": False,
                    "run_uuid": run_uuid,
                }
                metrics.append(point)
            else:
                params.append({"key": key, "value": str(value), "run_uuid": run_uuid})
    with Session(store.engine) as session, session.begin():
        session.execute(insert(SqlRun), runs)
        session.execute(insert(SqlParam), params)
        session.execute(insert(SqlMetric), metrics)
        session.execute(insert(SqlLatestMetric), metrics)
        session.execute(insert(SqlTag), tags)
    counts["runs"] += len(runs)
    counts["params"] += len(params)
    counts["metrics"] += len(metrics)
    counts["tags"] += len(tags)


def measure(
    client: Any,
    experiment_id: str,
    query: dict[str, str],
    max_results: int,
    low: int,
    high: int,
    seconds: float,
) -> dict[str, Any]:
    samples: list[float] = []
    returned = 0
    began = time.perf_counter()
    for n in range(high + 1):
        if n > low and time.perf_counter() - began > seconds:
            break
        start = time.perf_counter()
        page = client.search_runs(
            experiment_ids=[experiment_id], filter_string=query["filter"], max_results=max_results
        )
        elapsed = time.perf_counter() - start
        returned = len(page)
        if n:  # the first call warms the caches
            samples.append(elapsed)
    return {**query, "seconds": samples, "returned": returned}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-results", type=int, default=1000)
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--max-runs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0, help="per query")
    args = parser.parse_args(argv)

    import mlflow
    import sqlalchemy

    uri = f"sqlite:///{args.db}"
    began = time.perf_counter()
    store = SqlAlchemyStore(uri, tempfile.mkdtemp(prefix="mlflow-artifacts-"))
    schema_s = time.perf_counter() - began
    experiment_id = store.create_experiment("bench-peers")
    loaded = load(store, experiment_id, args.records)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")  # as a store that has been running a while
        conn.commit()
    client = MlflowClient(tracking_uri=uri)
    queries = json.loads(args.queries.read_text())
    results = [
        measure(client, experiment_id, q, args.max_results, args.min_runs, args.max_runs, args.seconds)
        for q in queries
    ]
    out = {
        "mlflow": mlflow.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "python": sys.version.split()[0],
        "schema_seconds": schema_s,
        "load": loaded,
        "queries": results,
    }
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
