"""Platform-shaped objects: public ids, ids from the platform, latest_version, files with datums,
ordering by fields, large pages; on both databases, through the real HTTP app (TestClient)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.ids import created_ms, looks_like_id, new_id
from worker.staging import Staging
from worker.uris import Target

pytestmark = pytest.mark.redis


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def stage(staging: Staging, execution: str, *lines: bytes) -> None:
    outcomes = [outcome(raw, n, execution) for n, raw in enumerate(lines, 1)]
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, "s")


def apply_all(engine: Engine, staging: Staging, keys: list[str]) -> None:
    for key in keys:
        apply_target(engine, staging, Target.parse(key))


def complete_version(engine: Engine, staging: Staging, dataset: str, version: str) -> None:
    apply_all(engine, staging, staging.complete_version(Target("version", dataset, version)))


def version_line(dataset: str, version: str, **props: Any) -> bytes:
    import orjson

    return orjson.dumps({"dataset-version": f"dataset://{dataset}/{version}", "metadata": props})


def datum_line(path: str, *uris: str, **props: Any) -> bytes:
    import orjson

    return orjson.dumps({"file": path, "metadata": {"valohai.dataset-versions": list(uris), **props}})


def test_ids_are_uuid_strings_that_sort_by_creation_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert ids == sorted(ids), "ids made one after another sort in that order"
    assert all(looks_like_id(i) and uuid.UUID(i).version == 7 for i in ids)
    assert before <= created_ms(ids[0]) <= created_ms(ids[-1]) <= after
    assert new_id(1_000) < new_id(2_000) < new_id()


def test_objects_carry_public_ids_and_any_id_form_finds_them(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    stage(staging, "e1", version_line("press", "v1", shift="night"))
    complete_version(engine, staging, "press", "v1")
    (version,) = client.get("/api/v0/dataset-versions/").json()["results"]
    dataset = client.get("/api/v0/datasets/").json()["results"][0]
    assert looks_like_id(version["id"]) and looks_like_id(dataset["id"])
    assert version["dataset"] == {"id": dataset["id"], "name": "press"}
    for path in (
        f"/api/v0/dataset-versions/{version['id']}/",
        f"/api/v0/dataset-versions/{version['id']}",  # without the trailing slash
        f"/api/v0/dataset-versions/{version['id'].upper()}/",
        "/api/v0/dataset-versions/1/",  # an old integer id
    ):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 200, path
        assert answer.json()["id"] == version["id"]
    assert client.get(f"/api/v0/datasets/{dataset['id']}").json()["name"] == "press"
    assert client.get(f"/api/v0/datasets/{dataset['id']}/metadata/").status_code == 200
    history = client.get(f"/api/v0/dataset-versions/{version['id']}/metadata/history/").json()
    assert [c["key"] for c in history["results"]] == ["shift"]
    for unknown in (str(uuid.uuid4()), new_id(), "press", "1e5", "0", "-1", "9" * 30, "²", "a b", "%00"):
        for base in ("datasets", "dataset-versions"):
            answer = client.get(f"/api/v0/{base}/{unknown}/")
            assert answer.status_code == 404, (base, unknown, answer.text)
            assert answer.json()["error"] == "not_found"
            assert client.post(f"/api/v0/{base}/{unknown}/metadata/", json={"a": 1}).status_code == 404


def test_a_version_event_keeps_the_platform_ids_and_tags(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    platform_dataset, platform_version = str(uuid.uuid4()), str(uuid.uuid4())
    event = {
        "type": "dataset_version_created",
        "data": {
            "dataset": {"name": "cams", "id": platform_dataset, "tags": ["vision"]},
            "version": {
                "id": platform_version,
                "name": "v7",
                "uri": "dataset://cams/v7",
                "tags": ["night", 3],
            },
        },
    }
    assert client.post("/webhooks/events", json=event).status_code == 202
    apply_all(engine, staging, ["dataset://cams/v7", "dataset://cams"])
    by_platform = client.get(f"/api/v0/dataset-versions/{platform_version}/").json()
    assert by_platform["uri"] == "dataset://cams/v7" and by_platform["platform_id"] == platform_version
    assert by_platform["status"] == "completed" and by_platform["tags"] == ["night"]
    dataset = client.get(f"/api/v0/datasets/{platform_dataset}/").json()
    assert dataset["name"] == "cams" and dataset["tags"] == ["vision"]
    assert dataset["id"] != platform_dataset  # ours; the platform's is kept beside it
    # Once given, an id never changes: a second event with other ids keeps the first.
    event["data"]["version"]["id"] = str(uuid.uuid4())  # type: ignore[index]
    assert client.post("/webhooks/events", json=event).status_code == 202
    assert client.get(f"/api/v0/dataset-versions/{platform_version}/").json()["id"] == by_platform["id"]
    # The list takes the dataset's id (the platform's or ours) as well as its name.
    for ref in (platform_dataset, dataset["id"], "cams"):
        listed = client.get("/api/v0/dataset-versions/", params={"dataset": ref}).json()
        assert [v["name"] for v in listed["results"]] == ["v7"], ref


def test_latest_version_is_the_newest_completed_one(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    stage(staging, "e1", version_line("press", "v1", n=1), version_line("press", "v2", n=2))
    apply_all(engine, staging, ["dataset://press/v1", "dataset://press/v2"])  # both building
    (dataset,) = client.get("/api/v0/datasets/").json()["results"]
    assert dataset["latest_version"] is None
    assert dataset["ctime"] and dataset["mtime"] and dataset["tags"] == []
    complete_version(engine, staging, "press", "v2")
    complete_version(engine, staging, "press", "v1")
    v1 = client.get("/api/v0/dataset-versions/", params={"name": "v1"}).json()["results"][0]
    for answer in (
        client.get(f"/api/v0/datasets/{dataset['id']}/").json(),
        client.get("/api/v0/datasets/").json()["results"][0],
    ):
        assert answer["latest_version"] == {"id": v1["id"], "name": "v1", "uri": "dataset://press/v1"}


def test_version_files_carry_datums_capped_in_lists_and_paged_in_the_detail(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    lines = [datum_line(f"part-{i:03}.csv", "dataset://big/v1", kind="part") for i in range(150)]
    stage(staging, "e1", *lines, datum_line("only.txt", "dataset://small/v1"))
    apply_all(engine, staging, staging.complete_execution("e1"))
    listed = {v["uri"]: v for v in client.get("/api/v0/dataset-versions/").json()["results"]}
    big, small = listed["dataset://big/v1"], listed["dataset://small/v1"]
    assert big["files_count"] == 150 and len(big["files"]) == 100
    assert small["files_count"] == 1 and [f["path"] for f in small["files"]] == ["only.txt"]
    first = big["files"][0]
    assert first["path"] == "part-000.csv" and first["execution"] == "e1"
    datum = first["datum"]
    assert datum["name"] == "part-000.csv" and looks_like_id(datum["id"])
    assert datum["output_execution"] == {"id": "e1"} and datum["uri"] is None
    assert datum["properties"] == {"kind": "part", "valohai.dataset-versions": ["dataset://big/v1"]}
    assert {"size", "md5", "sha1", "sha256", "ctime", "tags", "alias"} <= datum.keys()
    detail = client.get(f"/api/v0/dataset-versions/{big['id']}/").json()
    assert [f["path"] for f in detail["files"]] == [f"part-{i:03}.csv" for i in range(150)]
    page = client.get(f"/api/v0/dataset-versions/{big['id']}/?files_limit=20&files_offset=140").json()
    assert [f["path"] for f in page["files"]] == [f"part-{i:03}.csv" for i in range(140, 150)]
    assert page["files_count"] == 150 and page["files_offset"] == 140
    assert client.get(f"/api/v0/dataset-versions/{big['id']}/?files_limit=10001").status_code == 400


def test_a_list_reads_the_same_number_of_statements_whatever_its_length(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    lines = [datum_line(f"f{i}.csv", f"dataset://d{i % 30}/v1") for i in range(90)]
    stage(staging, "e1", *lines, *(version_line(f"d{i}", "v1", i=i) for i in range(30)))
    apply_all(engine, staging, staging.complete_execution("e1"))
    for i in range(30):
        complete_version(engine, staging, f"d{i}", "v1")
    statements: list[str] = []

    def count(*_args: Any) -> None:
        statements.append("x")

    event.listen(engine, "before_cursor_execute", count)
    try:
        sizes = {}
        for limit in (2, 30):
            for base in ("datasets", "dataset-versions"):
                statements.clear()
                assert len(client.get(f"/api/v0/{base}/?limit={limit}").json()["results"]) == limit
                sizes[(base, limit)] = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert sizes[("datasets", 2)] == sizes[("datasets", 30)], sizes
    assert sizes[("dataset-versions", 2)] == sizes[("dataset-versions", 30)], sizes


def test_ordering_takes_fields_and_properties(client: TestClient, engine: Engine, staging: Staging) -> None:
    names = ["b", "c", "a"]
    for n, name in enumerate(names):
        stage(staging, f"e{n}", version_line("press", name, rank=[3, 1, 2][n], name="x"))
        complete_version(engine, staging, "press", name)

    def order(ordering: str) -> list[str]:
        answer = client.get("/api/v0/dataset-versions/", params={"ordering": ordering})
        assert answer.status_code == 200, answer.text
        return [v["name"] for v in answer.json()["results"]]

    assert order("name") == ["a", "b", "c"] and order("-name") == ["c", "b", "a"]
    assert order("id") == names and order("-id") == names[::-1]
    assert order("ctime") == names and order("-ctime") == names[::-1]
    assert order("mtime") == names
    assert order("properties.rank") == ["c", "a", "b"] and order("-properties.rank") == ["b", "a", "c"]
    assert order("rank") == ["c", "a", "b"]  # a bare key that is not a field is a property
    bad = client.get("/api/v0/dataset-versions/", params={"ordering": "properties."})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_filter"


def test_large_pages_and_the_parameters_clients_send_are_accepted(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    stage(staging, "e1", version_line("press", "v1", a=1))
    complete_version(engine, staging, "press", "v1")
    extras = {"exclude": "x", "purged": "false", "deleted": "false", "no_count": "true", "project": new_id()}
    for base in ("datasets", "dataset-versions"):
        answer = client.get(f"/api/v0/{base}/", params={"limit": 10_000, **extras})
        assert answer.status_code == 200 and answer.json()["count"] == 1
        assert client.get(f"/api/v0/{base}/", params={"limit": 10_001}).status_code == 400


def test_a_dataset_is_created_by_name_as_clients_do(client: TestClient) -> None:
    answer = client.post("/api/v0/datasets/", json={"name": "uploads"})
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert looks_like_id(created["id"]) and created["latest_version"] is None and created["properties"] == {}
    assert client.get(f"/api/v0/datasets/{created['id']}/").json()["name"] == "uploads"
    again = client.post("/api/v0/datasets/", json={"name": "uploads"})
    assert again.status_code == 409 and again.json()["id"] == created["id"]
    bad: Any
    for bad in ({"name": "a/b"}, {"name": ""}, {"name": 3}, {}, [], {"name": "x" * 256}):
        answer = client.post("/api/v0/datasets/", json=bad)
        assert answer.status_code == 400 and answer.json()["error"] == "bad_request", bad
    assert client.get("/api/v0/datasets/").json()["count"] == 1
