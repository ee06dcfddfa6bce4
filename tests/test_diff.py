"""Version diffs: properties and files (by checksum) against a computed expectation, on both
databases, through the HTTP app and the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update

from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.staging import Staging
from worker.store.db import writer
from worker.store.models import Datum
from worker.uris import Target

pytestmark = pytest.mark.redis


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def run(engine: Engine, staging: Staging, execution: str, lines: list[dict[str, Any]]) -> None:
    outcomes = [outcome(orjson.dumps(line), n, execution) for n, line in enumerate(lines, 1)]
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, "s")
    for key in staging.complete_execution(execution):
        apply_target(engine, staging, Target.parse(key))


def checksum(engine: Engine, execution: str, path: str, sha: str, size: int) -> None:
    with writer(engine).begin() as conn:
        conn.execute(
            update(Datum)
            .where(Datum.execution == execution, Datum.path == path)
            .values(sha256=sha, size=size)
        )


def version(client: TestClient, name: str) -> dict[str, Any]:
    page = client.get("/api/v0/dataset-versions/", params={"dataset": "d", "name": name}).json()
    found: dict[str, Any] = page["results"][0]
    return found


def member(path: str, uri: str, base: str | None = None, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    item: dict[str, Any] = {"uri": uri}
    if base is not None:
        item["from"] = base
    if exclude:
        item["exclude"] = list(exclude)
    return {"file": path, "metadata": {"valohai.dataset-versions": [item]}}


def test_diff_of_properties_and_files(
    client: TestClient, engine: Engine, staging: Staging, settings: Any
) -> None:
    v1, v2 = "dataset://d/v1", "dataset://d/v2"
    run(
        engine,
        staging,
        "e1",
        [
            member("keep.csv", v1),
            member("same.csv", v1),
            member("edit.csv", v1),
            member("gone.csv", v1),
            {"dataset-version": v1, "metadata": {"a": 1, "b": "x", "c": [1]}},
        ],
    )
    for path, sha in (("keep.csv", "k"), ("same.csv", "s"), ("edit.csv", "e1"), ("gone.csv", "g")):
        checksum(engine, "e1", path, sha * 8, 10)
    # v2: from v1; same.csv and edit.csv uploaded again (same and new content), gone.csv dropped.
    run(
        engine,
        staging,
        "e2",
        [
            member("same.csv", v2, v1, ("same.csv", "edit.csv", "gone.csv")),
            member("edit.csv", v2, v1, ("same.csv", "edit.csv", "gone.csv")),
            member("new.csv", v2, v1, ("same.csv", "edit.csv", "gone.csv")),
            {"dataset-version": v2, "metadata": {"a": 2, "c": [1], "d": True}},
        ],
    )
    checksum(engine, "e2", "same.csv", "s" * 8, 10)
    checksum(engine, "e2", "edit.csv", "E2" * 4, 11)
    checksum(engine, "e2", "new.csv", "n" * 8, 3)
    second = version(client, "v2")
    answer = client.get(f"/api/v0/dataset-versions/{second['id']}/diff/")
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["against"]["uri"] == v1 and found["version"]["uri"] == v2
    assert found["properties"] == {
        "added": {"d": True},
        "removed": {"b": "x"},
        "changed": {"a": {"old": 1, "new": 2}},
    }
    files = found["files"]
    assert [f["name"] for f in files["added"]] == ["new.csv"]
    assert [f["name"] for f in files["removed"]] == ["gone.csv"]
    assert [f["name"] for f in files["changed"]] == ["edit.csv"]
    assert files["changed"][0]["old"]["sha256"] == "e1" * 8 and files["changed"][0]["new"]["size"] == 11
    assert files["counts"] == {"added": 1, "removed": 1, "changed": 1} and files["unchanged"] == 2
    # Against itself nothing changed; against a URI or an alias form too.
    same = client.get(f"/api/v0/dataset-versions/{second['id']}/diff/", params={"against": v2}).json()
    assert same["files"]["counts"] == {"added": 0, "removed": 0, "changed": 0}
    assert same["properties"] == {"added": {}, "removed": {}, "changed": {}}
    first = version(client, "v1")
    backwards = client.get(
        f"/api/v0/dataset-versions/{first['id']}/diff/", params={"against": second["id"]}
    ).json()
    assert [f["name"] for f in backwards["files"]["added"]] == ["gone.csv"]
    # The first version is compared with nothing.
    alone = client.get(f"/api/v0/dataset-versions/{first['id']}/diff/").json()
    assert alone["against"] is None and alone["files"]["counts"]["added"] == 4
    for bad in ("dataset://d", "dataset://nope/v1", "not-an-id"):
        answer = client.get(f"/api/v0/dataset-versions/{second['id']}/diff/", params={"against": bad})
        assert answer.status_code == 404, (bad, answer.text)
    assert (
        client.get(
            f"/api/v0/dataset-versions/{second['id']}/diff/", params={"against": "dataset://a b"}
        ).status_code
        == 400
    )

    env = settings.as_env()
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "diff", v2], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "~ a: 1 -> 2" in out.stdout and "+ file new.csv" in out.stdout and "- file gone.csv" in out.stdout
    assert "files: 1 added, 1 removed, 1 changed, 2 unchanged" in out.stdout
