"""The HTTP API in-process (TestClient) against real Redis and both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.helpers import outcome
from worker.api import create_app
from worker.staging import Staging
from worker.store.apply import apply_target
from worker.uris import Target

pytestmark = pytest.mark.redis

FILE = "exec-1/valohai.metadata.jsonl"
V1 = Target("version", "press", "v1")


@pytest.fixture
def sent() -> list[str]:
    return []


@pytest.fixture
def client(engine: Engine, staging: Staging, sent: list[str]) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, sent.append)) as c:
        yield c


def complete(engine: Engine, staging: Staging, target: Target = V1) -> None:
    for key in staging.complete_version(target):
        apply_target(engine, staging, Target.parse(key))


def stage(staging: Staging, raw: bytes, n: int = 1) -> None:
    staging.stage_lines(FILE, "exec-1", [outcome(raw, n)], "s")


def test_metadata_post_and_get(client: TestClient, engine: Engine, staging: Staging) -> None:
    stage(staging, b'{"dataset-version": "dataset://press/v1", "metadata": {"shift": "night", "n": 1}}')
    complete(engine, staging)
    (version,) = client.get("/api/v0/dataset-versions/?dataset=press&name=v1").json()["results"]
    url = f"/api/v0/dataset-versions/{version['id']}/metadata/"
    answer = client.post(url, json={"defect_rate": 0.002, "shift": None})
    assert answer.status_code == 200
    assert answer.json() == {"n": 1, "defect_rate": 0.002}
    assert client.get(url).json() == {"n": 1, "defect_rate": 0.002}
    dataset_id = version["dataset"]["id"]
    durl = f"/api/v0/datasets/{dataset_id}/metadata/"
    assert client.post(durl, json={"domain": "manufacturing", "machine": "press-04"}).json() == {
        "domain": "manufacturing",
        "machine": "press-04",
    }
    history = client.get(url + "history/").json()
    assert [(h["key"], h["old"], h["new"], h["source"]["origin"]) for h in history["results"]] == [
        ("shift", None, "night", "sidecar"),
        ("n", None, 1, "sidecar"),
        ("defect_rate", None, 0.002, "api"),
        ("shift", "night", None, "api"),
    ]
    assert history["results"][0]["source"]["line"] == 1


def test_writes_on_a_building_version_are_staged(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    stage(staging, b'{"dataset-version": "dataset://press/v1", "metadata": {"a": 1}}')
    apply_target(engine, staging, V1)  # registers the building version
    (version,) = client.get("/api/v0/dataset-versions/").json()["results"]
    assert version["status"] == "building" and version["properties"] == {}
    url = f"/api/v0/dataset-versions/{version['id']}/metadata/"
    answer = client.post(url, json={"b": 2})
    assert answer.status_code == 202 and answer.json() == {}
    complete(engine, staging)
    assert client.get(url).json() == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"{nope", 400, "not JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"": 1}', 400, "key length"),
        (b'{"' + b"k" * 257 + b'": 1}', 400, "key length"),
        (b'{"k": ' + b"[" * 33 + b"]" * 33 + b"}", 400, "deeper than 32"),
        (b'{"ok": 1, "valohai.last-used": "x"}', 400, "valohai.last-used"),
        (b'{"k": "' + b"x" * (1024 * 1024) + b'"}', 413, "body over"),
    ],
)
def test_bad_writes_change_nothing(
    client: TestClient, engine: Engine, staging: Staging, body: bytes, status: int, detail: str
) -> None:
    complete(engine, staging)
    (dataset,) = client.get("/api/v0/datasets/").json()["results"]
    url = f"/api/v0/datasets/{dataset['id']}/metadata/"
    answer = client.post(url, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    assert detail in answer.json()["detail"]
    assert client.get(url).json() == {}


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in (
        "/api/v0/datasets/99/",
        "/api/v0/dataset-versions/99/metadata/",
        "/api/v0/datasets/99/metadata/history/",
    ):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.json()["error"] == "not_found"
    assert client.post("/api/v0/datasets/99/metadata/", json={"a": 1}).status_code == 404


def test_resolve_latest_marks_last_used(client: TestClient, engine: Engine, staging: Staging) -> None:
    complete(engine, staging, V1)
    complete(engine, staging, Target("version", "press", "v2"))
    answer = client.get("/api/v0/dataset-versions/resolve/", params={"uri": "dataset://press/latest"})
    assert answer.status_code == 200 and answer.json()["name"] == "v2"
    assert "valohai.last-used" in answer.json()["properties"]
    (dataset,) = client.get("/api/v0/datasets/").json()["results"]
    assert "valohai.last-used" in dataset["properties"]
    assert (
        client.get("/api/v0/dataset-versions/resolve/", params={"uri": "dataset://nope/latest"}).status_code
        == 404
    )
    assert client.get("/api/v0/dataset-versions/resolve/", params={"uri": "s3://x"}).status_code == 400


def test_paging(client: TestClient, engine: Engine, staging: Staging) -> None:
    for i in range(5):
        complete(engine, staging, Target("version", "press", f"v{i}"))
    page = client.get("/api/v0/dataset-versions/?limit=2&offset=2").json()
    assert page["count"] == 5 and len(page["results"]) == 2
    assert "offset=4" in page["next"] and "offset=0" in page["previous"]


def test_token_auth(engine: Engine, staging: Staging) -> None:
    with TestClient(create_app(engine, staging, lambda key: None, api_token="t0ken")) as c:
        assert c.get("/api/v0/datasets/").status_code == 401
        assert c.get("/api/v0/datasets/", headers={"Authorization": "Token wrong"}).status_code == 401
        assert c.get("/api/v0/datasets/", headers={"Authorization": "Token t0ken"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_webhook_inputs_mark_last_used(
    client: TestClient, engine: Engine, staging: Staging, sent: list[str]
) -> None:
    complete(engine, staging, V1)
    event = {
        "type": "execution_started",
        "data": {"inputs": {"train": ["dataset://press/latest", "dataset://nope/v1"]}},
    }
    answer = client.post("/webhooks/events", json=event)
    assert answer.status_code == 202 and answer.json()["status"] == "ignored"
    (version,) = client.get("/api/v0/dataset-versions/").json()["results"]
    assert "valohai.last-used" in version["properties"]
    done = client.post(
        "/webhooks/events",
        json={"type": "dataset_version_created", "data": {"version": {"uri": "dataset://press/v2"}}},
    )
    assert done.status_code == 202 and set(sent) >= {"dataset://press/v2", "dataset://press"}


def test_openapi_describes_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/v0/datasets/",
        "/api/v0/dataset-versions/",
        "/api/v0/datasets/{owner_id}/metadata/",
        "/api/v0/dataset-versions/{owner_id}/metadata/history/",
        "/api/v0/dataset-versions/resolve/",
        "/webhooks/events",
    ):
        assert path in spec["paths"], path
    post = spec["paths"]["/api/v0/datasets/{owner_id}/metadata/"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["type"] == "object"
    params = {p["name"] for p in spec["paths"]["/api/v0/dataset-versions/"]["get"]["parameters"]}
    assert {"filter", "ordering", "dataset", "name", "limit", "offset"} <= params


def test_redis_down_is_a_json_503(engine: Engine) -> None:
    import redis as redis_lib

    from worker.keys import Keys

    dead = Staging(redis_lib.Redis(port=1, socket_connect_timeout=0.2), Keys("dead"))
    with TestClient(create_app(engine, dead, lambda key: None)) as c:
        answer = c.post(
            "/webhooks/events",
            json={"type": "dataset_version_created", "data": {"version": {"uri": "dataset://a/b"}}},
        )
        assert answer.status_code == 503 and answer.json()["error"] == "unavailable"
