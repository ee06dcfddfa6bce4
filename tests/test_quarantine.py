"""A target whose apply keeps failing is quarantined, holds its entries, and comes back on retry.

The failure is one no check foresaw: a trigger in the real database refuses one key (on
PostgreSQL a PL/pgSQL `RAISE EXCEPTION`, on SQLite `RAISE(ABORT)`), so the apply fails with an
error that is not transient, as a store limit nobody checked would. A real `sidecar worker`
retries it a bounded number of times, then quarantines it; the other versions apply meanwhile;
`sidecar retry` (the real CLI) puts it back once the trigger is gone, and the database then equals
the oracle's fold of the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.e2e_helpers import clean_env, wait_until
from tests.oracle import assert_matches_db, db_state, expected_state
from tests.test_worker_process import Worker, start_worker, workers  # noqa: F401 - fixture
from worker.api import create_app
from worker.applying import apply_target
from worker.ingest import Ingestor
from worker.settings import Settings
from worker.staging import Staging
from worker.status import collect
from worker.store import quarantine
from worker.tasks import Enqueuer, make_app
from worker.uris import Target

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

GOOD, BAD = Target("version", "q", "good"), Target("version", "q", "bad")
DEADLINE = 120.0


def _poison(engine: Engine) -> None:
    """Make every insert of a history row for key `poison` fail, as the database's own error."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.key = 'poison' THEN RAISE EXCEPTION 'poisoned by the test'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON property_changes "
                "FOR EACH ROW EXECUTE FUNCTION poison()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON property_changes WHEN NEW.key = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned by the test'); END"
            )


def _cure(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER poison ON property_changes"
            if engine.dialect.name == "postgresql"
            else "DROP TRIGGER poison"
        )


def _append(path: Path, uri: str, metas: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for meta in metas:
            f.write(json.dumps({"dataset-version": uri, "metadata": meta}) + "\n")


@pytest.fixture
def fast_retries(settings: Settings) -> Settings:
    return settings.with_(apply_retries=2, apply_retry_backoff=0.05)


def _sidecar(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=clean_env(settings.as_env()),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_failing_target_is_quarantined_held_shown_and_retried(
    fast_retries: Settings,
    staging: Staging,
    engine: Engine,
    workers: list[Worker],  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    settings = fast_retries
    root = settings.require_root()
    good_file, bad_file = (
        root / "exec-good" / "valohai.metadata.jsonl",
        root / "exec-bad" / "valohai.metadata.jsonl",
    )
    _append(good_file, GOOD.key, [{"a": 1}, {"b": "two"}])
    _append(bad_file, BAD.key, [{"a": 1}, {"poison": True, "c": 3}, {"a": 2}])
    ingestor = Ingestor(root, staging, line_limit=settings.line_limit)
    enqueue = Enqueuer(make_app(settings))
    worker = start_worker(settings, workers, tmp_path)
    worker.wait_ready()
    # As the watcher does: the first sighting of each version registers it (building).
    for path in (good_file, bad_file):
        for key in ingestor.ingest(path).due:
            enqueue(key)
    both_building = {GOOD.key: "building", BAD.key: "building"}
    wait_until(lambda: _status(engine) == both_building, timeout=DEADLINE, what="registered")
    _poison(engine)
    for target in (GOOD, BAD):
        for key in staging.complete_version(target):
            enqueue(key)

    wait_until(
        lambda: BAD.key in staging.quarantined(), timeout=DEADLINE, what=f"quarantine\n{worker.log()[-3000:]}"
    )
    record = staging.quarantined()[BAD.key]
    assert record["attempts"] == 3  # the first try and two retries
    assert "poisoned by the test" in record["error"] and "INSERT" not in record["error"]
    assert BAD.key in quarantine.listed(engine)  # durable, in the database too
    assert worker.log().count(f"apply {BAD.key} failed") == 2
    # The others applied meanwhile; the quarantined one shows nothing of its lines.
    state = expected_state([good_file])
    wait_until(lambda: _matches(engine, state, [GOOD.key]), timeout=DEADLINE, what="the good version")
    assert_matches_db(engine, {BAD.key: {}}, only=[BAD.key])

    # Held: a later line is staged, but no apply runs for it, and the target is not due.
    _append(bad_file, BAD.key, [{"late": "yes"}])
    for key in ingestor.ingest(bad_file).due:
        enqueue(key)
    wait_until(lambda: BAD.key not in staging.due_targets(older_than=-1), timeout=DEADLINE, what="held")
    assert apply_target(engine, staging, BAD).skipped == "quarantined"
    assert_matches_db(engine, {BAD.key: {}}, only=[BAD.key])

    # Shown: status (exit 1), /readyz, the metric, the page's JSON.
    report = collect(staging, stuck_after=300)
    assert [q["target"] for q in report["quarantined"]] == [BAD.key]
    assert any("quarantined" in p for p in report["problems"])
    status = _sidecar(settings, "status")
    assert status.returncode == 1 and BAD.key in status.stdout and "poisoned by the test" in status.stdout
    client = TestClient(create_app(engine, staging, enqueue))
    ready = client.get("/readyz").json()
    assert ready["quarantined"] == {"count": 1, "targets": [BAD.key]}
    assert "sidecar_quarantined_targets 1.0" in client.get("/metrics").text
    versions = client.get("/api/v0/dataset-versions/", params={"dataset": "q"}).json()["results"]
    bad_id = next(v["id"] for v in versions if v["name"] == "bad")
    page = client.get(f"/api/web/dataset-versions/{bad_id}/staged/").json()
    assert page["quarantined"]["attempts"] == 3

    # Retry: unknown targets are refused; the cured one applies, with the line staged while held.
    refused = _sidecar(settings, "retry", GOOD.key)
    assert refused.returncode == 1 and "not quarantined" in refused.stderr
    _cure(engine)
    retried = _sidecar(settings, "retry", BAD.key)
    assert retried.returncode == 0, retried.stderr
    expected = expected_state([good_file, bad_file])
    wait_until(
        lambda: _matches(engine, expected, [GOOD.key, BAD.key]),
        timeout=DEADLINE,
        what=f"the retried version\n{worker.log()[-3000:]}",
    )
    assert staging.quarantined() == {} and quarantine.listed(engine) == {}
    assert _sidecar(settings, "status").returncode == 0
    assert client.get("/readyz").json()["quarantined"]["count"] == 0


def _status(engine: Engine) -> dict[str, str]:
    return db_state(engine)[1]


def _matches(engine: Engine, expected: dict[str, dict[str, object]], only: list[str]) -> bool:
    try:
        assert_matches_db(engine, expected, only=only, completed=only)
    except AssertionError:
        return False
    return True


def test_a_release_racing_a_hold_keeps_the_target_due(staging: Staging) -> None:
    """`release` between an apply's snapshot and its hold: the hold does nothing, the target stays due."""
    staging.quarantine(BAD, "Boom: x", 6, "2026-12-02T00:00:00+00:00")
    assert BAD.key not in staging.due_targets(older_than=-1)
    staging.release(BAD)
    assert staging.hold(BAD) is False  # the mark went first: nothing is taken out of the due set
    assert BAD.key in staging.due_targets(older_than=-1)
    assert staging.note_failure(BAD) == 1  # the count restarted
    staging.clear_failures(BAD)
    assert staging.note_failure(BAD) == 1
