"""The re-check after a definition change (store/definitions.py): one pass per change, resumed at
its cursor, started again when the definitions change under it, its progress in `sidecar status`,
and the lock that orders changes against applies on PostgreSQL. Both databases."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from tests.e2e_helpers import wait_until
from tests.test_apply_definitions import complete, define, stage
from worker.api import create_app
from worker.staging import Staging
from worker.status import collect, recheck_report
from worker.store import definitions as stored
from worker.store.db import make_engine, writer
from worker.store.models import Base, Dataset, DatasetVersion, Datum

pytestmark = pytest.mark.redis

LINES = (
    b'{"dataset": "dataset://press", "metadata": {"n": "x"}}',
    b'{"dataset-version": "dataset://press/v1", "metadata": {"n": "x"}}',
    b'{"file": "a.png", "metadata": {"n": 1, "valohai.dataset-versions": ["dataset://press/v1"]}}',
)


def violations(engine: Engine) -> list[list[Any]]:
    """The violations of the dataset, the version and the datum, in that order."""
    with Session(engine) as s:
        return [list(s.scalars(select(t.violations))) for t in (Dataset, DatasetVersion, Datum)]


@pytest.fixture
def filled(engine: Engine, staging: Staging) -> Engine:
    stage(staging, *LINES)
    complete(engine, staging)  # no definitions yet: nothing violates
    return engine


def test_a_change_asks_for_one_pass_and_a_pass_covers_it(filled: Engine) -> None:
    engine = filled
    assert recheck_report(engine)["state"] == "current"
    define(engine, {"key": "n", "type": "string"})
    assert recheck_report(engine)["state"] == "pending"
    done = stored.recheck(engine, batch=1)
    assert (done.outcome, done.checked, done.changed, done.violating) == ("done", 3, 1, 1)
    assert violations(engine) == [[[]], [[]], [[{"key": "n", "rule": "type", "value": 1}]]]
    report = recheck_report(engine)
    assert report["state"] == "current" and report["checked"] == 3 and report["finished_at"]
    assert stored.recheck(engine).outcome == "current"  # a duplicate task does nothing
    define(engine, {"key": "n", "type": "string"})  # unchanged: no new generation
    assert recheck_report(engine)["state"] == "current"
    stored.remove(engine, "n")
    assert stored.recheck(engine).changed == 1
    assert violations(engine) == [[[]], [[]], [[]]]


def test_a_pass_killed_midway_resumes_at_its_cursor(filled: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = filled
    define(engine, {"key": "n", "type": "integer"})
    real = stored.load
    calls: list[int] = []

    def dies_at_the_second_batch(conn: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("worker killed")
        return real(conn, **kw)

    monkeypatch.setattr(stored, "load", dies_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        stored.recheck(engine, batch=1)
    monkeypatch.setattr(stored, "load", real)
    report = recheck_report(engine)
    assert (report["state"], report["checked"], report["total"]) == ("running", 1, 3)
    done = stored.recheck(engine, batch=1)
    assert (done.outcome, done.checked, done.violating) == ("done", 3, 2)  # each owner once
    assert violations(engine)[:2] == [
        [[{"key": "n", "rule": "type", "value": "x"}]],
        [[{"key": "n", "rule": "type", "value": "x"}]],
    ]


def test_a_change_during_a_pass_starts_it_again_and_a_second_runner_stops(filled: Engine) -> None:
    engine = filled
    define(engine, {"key": "n", "type": "integer"})
    generation = recheck_report(engine)["generation"]
    cursor = stored._start(engine, generation)
    define(engine, {"key": "n", "type": "string"})  # under the pass
    assert stored._run(engine, generation, cursor, 1) is None  # told to start again
    done = stored.recheck(engine, batch=1)
    assert done.outcome == "done" and done.violating == 1  # only the datum: the newer definition
    report = recheck_report(engine)
    assert report["checked_generation"] == report["generation"] == generation + 1
    # Two runners of one generation: the one whose cursor moved under it stops.
    define(engine, {"key": "n", "type": "number"})
    generation = recheck_report(engine)["generation"]
    stale = stored._start(engine, generation)
    assert stored.recheck(engine, batch=1).outcome == "done"  # resumes the same pass, finishes it
    assert stored._run(engine, generation, stale, 1) == stored.Rechecked(outcome="elsewhere")


def test_status_shows_the_recheck_and_a_change_nobody_rechecks_is_a_problem(
    filled: Engine, staging: Staging
) -> None:
    engine = filled
    define(engine, {"key": "n", "type": "string"})
    report = collect(staging, stuck_after=0, engine=engine)
    assert report["definitions_recheck"]["state"] == "pending"
    assert any("re-check" in p for p in report["problems"])
    stored.recheck(engine)
    report = collect(staging, stuck_after=0, engine=engine)
    assert report["definitions_recheck"]["state"] == "current"
    assert not any("re-check" in p for p in report["problems"])


def test_the_api_asks_for_a_recheck_after_a_change_only(engine: Engine, staging: Staging) -> None:
    asked: list[None] = []
    app = create_app(engine, staging, lambda _key: None, recheck=lambda: asked.append(None))
    with TestClient(app) as client:
        url = "/api/v0/property-definitions/n/"
        assert client.put(url, json={"type": "string"}).status_code == 201
        assert client.put(url, json={"type": "string"}).status_code == 200  # the same again
        assert len(asked) == 1
        assert client.put(url, json={"type": "integer"}).status_code == 200
        assert client.delete(url).status_code == 204
        assert client.delete(url).status_code == 404
    assert len(asked) == 3


@pytest.fixture
def pg_engine(pg_schema_url: str) -> Iterator[Engine]:
    """PostgreSQL only (SQLite has one writer at a time: a change and an apply never overlap)."""
    engine = make_engine(pg_schema_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_a_change_waits_for_an_apply_that_read_the_definitions(pg_engine: Engine) -> None:
    """PostgreSQL: the apply's read holds the generation (FOR KEY SHARE) to its commit, so a change
    cannot commit between an apply's read of the old definitions and its write."""
    engine = pg_engine
    changed = threading.Event()

    def change() -> None:
        define(engine, {"key": "n", "type": "string"})
        changed.set()

    with writer(engine).begin() as apply_conn:
        stored.load(apply_conn)
        pid = apply_conn.execute(text("select pg_backend_pid()")).scalar()
        thread = threading.Thread(target=change)
        thread.start()

        def change_waits_on_our_lock() -> bool:
            with engine.connect() as c:
                blockers = c.execute(
                    text("select pg_blocking_pids(pid) from pg_stat_activity where pid <> :me"), {"me": pid}
                ).scalars()
                return any(pid in (b or []) for b in blockers)

        wait_until(change_waits_on_our_lock, timeout=30, what="the change waiting for the apply")
        assert not changed.is_set()
    thread.join(timeout=30)
    assert changed.is_set() and recheck_report(engine)["state"] == "pending"
