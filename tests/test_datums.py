"""Datums in the API: list, search, order, read, write (staged while running), aliases; both databases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.staging import Staging
from worker.store.models import AliasChange, Datum
from worker.uris import Target

pytestmark = pytest.mark.redis


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def datum_line(path: str, metadata: dict[str, Any]) -> bytes:
    return orjson.dumps({"file": path, "metadata": metadata})


def stage(staging: Staging, execution: str, lines: list[bytes]) -> None:
    outcomes = [outcome(raw, n, execution) for n, raw in enumerate(lines, 1)]
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, f"s{len(lines)}")


def complete(engine: Engine, staging: Staging, execution: str) -> None:
    for key in staging.complete_execution(execution):
        apply_target(engine, staging, Target.parse(key))


def run(engine: Engine, staging: Staging, execution: str, files: dict[str, dict[str, Any]]) -> None:
    stage(staging, execution, [datum_line(p, m) for p, m in files.items()])
    complete(engine, staging, execution)


def names(answer: Any) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [d["name"] for d in answer.json()["results"]]


def test_list_filter_order_and_get(client: TestClient, engine: Engine, staging: Staging) -> None:
    run(
        engine,
        staging,
        "exec-1",
        {
            "b.png": {"camera": "top", "score": 0.5, "valohai.tags": ["good", "train"]},
            "a.png": {"camera": "side", "score": 0.9, "valohai.tags": ["train"]},
            "sub/c.png": {"camera": "top", "score": 0.1},
        },
    )
    run(engine, staging, "exec-2", {"a.png": {"camera": "top", "score": 0.7}})
    assert names(client.get("/api/v0/data/?output_execution=exec-1")) == ["b.png", "a.png", "sub/c.png"]
    assert names(client.get("/api/v0/data/?output_execution=exec-1&ordering=name")) == [
        "a.png",
        "b.png",
        "sub/c.png",
    ]
    assert names(client.get("/api/v0/data/?ordering=-score")) == ["a.png", "a.png", "b.png", "sub/c.png"]
    assert names(client.get("/api/v0/data/?ordering=properties.score&limit=2")) == ["sub/c.png", "b.png"]
    assert len(names(client.get("/api/v0/data/?ordering=-ctime"))) == 4
    assert names(client.get("/api/v0/data/?tag=good")) == ["b.png"]
    assert names(client.get("/api/v0/data/?tag=train&ordering=-id")) == ["a.png", "b.png"]
    assert names(client.get('/api/v0/data/?filter=camera = "top" and score > 0.3')) == ["b.png", "a.png"]
    assert names(client.get("/api/v0/data/?name=a.png&output_execution=exec-2")) == ["a.png"]
    # What clients send besides: accepted, and ignored.
    extra = "exclude=x&purged=false&deleted=false&no_count=true&project=p"
    assert len(names(client.get(f"/api/v0/data/?{extra}"))) == 4
    page = client.get("/api/v0/data/?limit=1&offset=1").json()
    assert page["count"] == 4 and page["next"] and page["previous"]
    assert client.get("/api/v0/data/?filter=camera =").status_code == 400

    first = client.get("/api/v0/data/?tag=good").json()["results"][0]
    assert first["tags"] == ["good", "train"] and first["properties"] == {"camera": "top", "score": 0.5}
    assert first["output_execution"] == {"id": "exec-1"} and first["uri"] is None
    assert first["size"] is None and first["purged"] is False
    for path in (f"/api/v0/data/{first['id']}/", f"/api/v0/data/{first['id']}"):
        assert client.get(path).json() == first
    with Session(engine) as session:
        integer_id = session.scalar(select(Datum.id).where(Datum.uid == first["id"]))
    assert client.get(f"/api/v0/data/{integer_id}/").json()["id"] == first["id"]
    for bad in ("nope", "0", "99999999999999999999999", "00000000-0000-7000-8000-000000000000"):
        answer = client.get(f"/api/v0/data/{bad}/")
        assert answer.status_code == 404 and answer.json()["error"] == "not_found"
    download = client.get(f"/api/v0/data/{first['id']}/download/")
    assert download.status_code == 200 and download.json()["url"] is None


def test_writes_with_history_tags_and_alias(client: TestClient, engine: Engine, staging: Staging) -> None:
    run(engine, staging, "exec-1", {"m.bin": {"epoch": 1}})
    (datum,) = client.get("/api/v0/data/").json()["results"]
    url = f"/api/v0/data/{datum['id']}/metadata/"
    body = {"epoch": None, "ok": True, "valohai.tags": ["x"], "valohai.alias": "best"}
    answer = client.post(url, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "valohai.tags": ["x"], "valohai.alias": "best"}
    now = client.get(f"/api/v0/data/{datum['id']}/").json()
    assert now["tags"] == ["x"] and now["alias"] == "best" and now["properties"] == {"ok": True}
    history = client.get(f"/api/v0/data/{datum['id']}/history/").json()["results"]
    assert [(h["key"], h["source"]["origin"]) for h in history] == [
        ("epoch", "sidecar"),
        ("epoch", "api"),
        ("ok", "api"),
        ("valohai.tags", "api"),
        ("valohai.alias", "api"),
    ]
    resolved = client.get("/api/v0/datum-aliases/resolve/?name=best")
    assert resolved.status_code == 200 and resolved.json()["datum"]["id"] == datum["id"]
    assert client.get("/api/v0/datum-aliases/resolve/?name=nope").status_code == 404
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"valohai.last-used": "x"}, "valohai.last-used"),
        ({"valohai.tags": "x"}, "valohai.tags"),
        ({"valohai.alias": "a b"}, "valohai.alias"),
        ({"valohai.alias": "a" * 256}, "valohai.alias"),
    ]
    for body, key in refusals:
        refused = client.post(url, json=body)
        assert refused.status_code == 400 and refused.json()["key"] == key, refused.text
    bulk = client.post("/api/v0/data/metadata/apply/", json={"datum_metadata": {datum["id"]: {"n": 2}}})
    assert bulk.status_code == 200 and bulk.json()["datum_metadata"][datum["id"]]["n"] == 2
    unknown = client.post("/api/v0/data/metadata/apply/", json={"datum_metadata": {"nope": {"n": 3}}})
    assert unknown.status_code == 404
    assert client.get(url).json()["n"] == 2
    assert client.post("/api/v0/data/metadata/apply/", json={"x": 1}).status_code == 400


def test_write_on_a_running_execution_is_staged(client: TestClient, engine: Engine, staging: Staging) -> None:
    # A version completed first: its member entry creates the datum while exec-1 still runs.
    line = datum_line("f.csv", {"rows": 1, "valohai.dataset-versions": ["dataset://d/v1"]})
    stage(staging, "exec-1", [line])
    for key in staging.complete_version(Target("version", "d", "v1")):
        apply_target(engine, staging, Target.parse(key))
    (datum,) = client.get("/api/v0/data/").json()["results"]
    assert datum["properties"] == {}
    answer = client.post(f"/api/v0/data/{datum['id']}/metadata/", json={"rows": 2, "note": "api"})
    assert answer.status_code == 202 and answer.json() == {}
    complete(engine, staging, "exec-1")
    got = client.get(f"/api/v0/data/{datum['id']}/").json()["properties"]
    assert got["rows"] == 2 and got["note"] == "api"  # staged after the line: applied after it


def test_alias_moves_at_completion_with_history(client: TestClient, engine: Engine, staging: Staging) -> None:
    run(engine, staging, "exec-1", {"model.pt": {"valohai.alias": "prod-model"}})
    first = client.get("/api/v0/datum-aliases/resolve/?name=prod-model").json()["datum"]
    assert first["output_execution"]["id"] == "exec-1"
    stage(staging, "exec-2", [datum_line("model.pt", {"valohai.alias": "prod-model"})])
    # Not moved before exec-2 completes.
    assert client.get("/api/v0/datum-aliases/resolve/?name=prod-model").json()["datum"]["id"] == first["id"]
    complete(engine, staging, "exec-2")
    second = client.get("/api/v0/datum-aliases/resolve/?name=prod-model").json()["datum"]
    assert second["output_execution"]["id"] == "exec-2" and second["alias"] == "prod-model"
    listed = client.get("/api/v0/datum-aliases/").json()
    assert listed["count"] == 1 and listed["results"][0]["datum"]["id"] == second["id"]
    with Session(engine) as session:
        moves = session.scalars(select(AliasChange).order_by(AliasChange.id)).all()
        uids = {r[0]: r[1] for r in session.execute(select(Datum.id, Datum.uid))}
    assert [(m.alias_kind, m.old_id and uids[m.old_id], uids[m.new_id]) for m in moves] == [
        ("datum", None, first["id"]),
        ("datum", first["id"], second["id"]),
    ]
    assert moves[1].source["execution"] == "exec-2"


def test_bad_alias_is_a_reject_and_the_rest_applies(engine: Engine, staging: Staging, tmp_path: Any) -> None:
    from worker.ingest import Ingestor

    root = tmp_path / "root"
    (root / "exec-1").mkdir(parents=True)
    lines = [datum_line("a.txt", {"k": 1, "valohai.alias": "no spaces"}), datum_line("b.txt", {"k": 2})]
    (root / "exec-1" / "valohai.metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    Ingestor(root, staging, line_limit=1 << 20).ingest(root / "exec-1" / "valohai.metadata.jsonl")
    complete(engine, staging, "exec-1")
    (reject,) = staging.rejects()
    assert reject.line == 1 and "valohai.alias" in reject.reason
    with Session(engine) as session:
        got = {r[0]: r[1] for r in session.execute(select(Datum.path, Datum.properties))}
    assert got == {"a.txt": {"k": 1}, "b.txt": {"k": 2}}


def test_datum_page(client: TestClient, engine: Engine, staging: Staging) -> None:
    run(engine, staging, "exec-1", {"m.bin": {"epoch": 1}})
    (datum,) = client.get("/api/v0/data/").json()["results"]
    page = client.get(f"/data/{datum['id']}/")
    assert page.status_code == 200 and f'data-id="{datum["id"]}"' in page.text
    assert 'data-page="datum"' in page.text
    assert client.get("/data/nope/").status_code == 404


def test_write_after_retention_is_applied_directly(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    run(engine, staging, "exec-1", {"m.bin": {"epoch": 1}})
    (datum,) = client.get("/api/v0/data/").json()["results"]
    # Retention forgot the execution: its flag and stream left Redis; its watermark row stays.
    target = Target.for_execution("exec-1")
    staging.redis.delete(staging.keys.done(target), staging.keys.stream(target))
    answer = client.post(f"/api/v0/data/{datum['id']}/metadata/", json={"epoch": 2})
    assert answer.status_code == 200 and answer.json() == {"epoch": 2}
    assert not staging.redis.exists(staging.keys.stream(target))  # Redis was not written
    history = client.get(f"/api/v0/data/{datum['id']}/history/").json()["results"]
    assert [(h["old"], h["new"], h["source"]["origin"]) for h in history] == [
        (None, 1, "sidecar"),
        (1, 2, "api"),
    ]
    assert client.get("/api/v0/data/?filter=epoch = 2").json()["count"] == 1  # index updated too


def test_checksum_task_without_a_root_skips(caplog: pytest.LogCaptureFixture) -> None:
    from worker.settings import Settings
    from worker.tasks import run_checksums

    def no_engine() -> Engine:
        raise AssertionError("a worker without a root must not read the database")

    assert run_checksums(Settings(), no_engine, "exec-1") == {"skipped": "no root"}
    assert run_checksums(Settings(), no_engine, "exec-2") == {"skipped": "no root"}
    assert sum("no SIDECAR_ROOT" in r.getMessage() for r in caplog.records) <= 1


def test_two_executions_moving_one_alias_at_once(engine: Engine, staging: Staging) -> None:
    import threading

    executions = [f"exec-{i}" for i in range(4)]
    for execution in executions:
        stage(staging, execution, [datum_line("model.pt", {"valohai.alias": "shared"})])
        staging.complete_execution(execution)
    errors: list[BaseException] = []

    def apply(execution: str) -> None:
        try:
            apply_target(engine, staging, Target.for_execution(execution))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=apply, args=(e,)) for e in executions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Session(engine) as session:
        moves = session.scalars(select(AliasChange).order_by(AliasChange.id)).all()
        from worker.store.datums import resolve_alias

        final = resolve_alias(session, "shared").id
    # One chain: created once, then each move starts where the one before it ended.
    assert moves[0].old_id is None and all(m.old_id is not None for m in moves[1:])
    assert all(a.new_id == b.old_id for a, b in zip(moves, moves[1:], strict=False))
    assert moves[-1].new_id == final and len(moves) == len(executions)
