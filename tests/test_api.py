"""The HTTP API in-process (TestClient) against real Redis and both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.staging import Staging
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


# -- the HTTP edge (hardening): each of these was a finding against the old server ------------

JSON = {"content-type": "application/json"}


def dataset_url(client: TestClient, engine: Engine, staging: Staging) -> str:
    complete(engine, staging)
    (dataset,) = client.get("/api/v0/datasets/").json()["results"]
    return f"/api/v0/datasets/{dataset['id']}/metadata/"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_writes_need_json_content_type(
    client: TestClient, engine: Engine, staging: Staging, sent: list[str], content_type: str | None
) -> None:
    # A browser sends these cross-origin with no preflight: they must not write anything.
    url = dataset_url(client, engine, staging)
    headers = {"content-type": content_type} if content_type else {}
    answer = client.post(url, content=b'{"a": 1}', headers=headers)
    assert answer.status_code == 415 and answer.json()["error"] == "unsupported_media_type"
    assert client.get(url).json() == {}
    event = b'{"type": "dataset_version_created", "data": {"version": {"uri": "dataset://press/v9"}}}'
    assert client.post("/webhooks/events", content=event, headers=headers).status_code == 415
    assert sent == [] and staging.complete_version(Target("version", "press", "v9")) != []


def test_json_with_charset_is_accepted(client: TestClient, engine: Engine, staging: Staging) -> None:
    url = dataset_url(client, engine, staging)
    answer = client.post(
        url, content=b'{"a": 1}', headers={"content-type": "application/json; charset=utf-8"}
    )
    assert answer.status_code == 200 and answer.json() == {"a": 1}


def test_foreign_origins_cannot_write(engine: Engine, staging: Staging) -> None:
    app = create_app(engine, staging, lambda key: None, allowed_origins=["https://ops.example"])
    with TestClient(app, base_url="http://sidecar.local:8000") as c:
        url = dataset_url(c, engine, staging)
        evil = c.post(url, json={"a": 1}, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["error"] == "forbidden"
        assert c.post(url, json={"a": 1}, headers={"Origin": "null"}).status_code == 403
        assert c.post(url, json={"a": 2}, headers={"Origin": "http://sidecar.local:8000"}).status_code == 200
        assert c.post(url, json={"a": 3}, headers={"Origin": "https://ops.example"}).status_code == 200
        assert c.post(url, json={"a": 4}).status_code == 200  # no Origin: not a browser
        assert c.get(url, headers={"Origin": "https://evil.example"}).json() == {"a": 4}


def test_webhook_body_is_capped_while_read(engine: Engine, staging: Staging) -> None:
    import asyncio

    app = create_app(engine, staging, lambda key: None)
    chunk = b" " * 65536
    received: list[int] = []
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:  # chunked: no Content-Length to refuse up front
        received.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(received) < 10_000}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/webhooks/events",
        "raw_path": b"/webhooks/events",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
        "http_version": "1.1",
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    assert sum(received) <= 1024 * 1024 + len(chunk)  # stopped just past 1 MiB, not at 640 MiB


def test_large_bodies_are_refused_up_front(client: TestClient, sent: list[str]) -> None:
    big = client.post("/webhooks/events", content=b" " * (1024 * 1024 + 1), headers=JSON)
    assert big.status_code == 413 and big.json()["error"] == "too_large"
    assert client.request("GET", "/healthz", content=b" " * (1024 * 1024 + 1)).status_code == 413
    assert sent == []


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ({"offset": "99999999999999999999"}, "offset"),
        ({"offset": "-1"}, "offset"),
        ({"limit": "0"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_paging_is_range_checked(client: TestClient, query: dict[str, str], parameter: str) -> None:
    for path in ("/api/v0/datasets/", "/api/v0/dataset-versions/"):
        answer = client.get(path, params=query)
        assert answer.status_code == 400, answer.text
        assert answer.json()["parameter"] == parameter and parameter in answer.json()["detail"]


def test_huge_filter_numbers_are_bad_filters(client: TestClient) -> None:
    for text in ("sample_count > " + "9" * 400, "x < -1" + "0" * 400, "x = 1e999"):
        answer = client.get("/api/v0/dataset-versions/", params={"filter": text})
        assert answer.status_code == 400 and answer.json()["position"] == text.index(
            next(c for c in text if c in "-0123456789")
        )


@pytest.mark.parametrize("raw_id", [str(2**64), str(2**63), "0", "-5"])
def test_ids_beyond_64_bits_are_404(client: TestClient, raw_id: str) -> None:
    for path in (
        f"/api/v0/datasets/{raw_id}/",
        f"/api/v0/dataset-versions/{raw_id}/metadata/",
        f"/api/v0/datasets/{raw_id}/metadata/history/",
        f"/api/web/dataset-versions/{raw_id}/staged/",
    ):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.json()["error"] == "not_found", path
    assert client.post(f"/api/v0/datasets/{raw_id}/metadata/", json={"a": 1}).status_code == 404


def test_5xx_bodies_carry_no_exception_text(staging: Staging) -> None:
    from worker.store.db import make_engine

    dead = make_engine("postgresql://admin:s3cret-pw@127.0.0.1:1/nope?connect_timeout=1")
    with TestClient(create_app(dead, staging, lambda key: None)) as c:
        answer = c.get("/api/v0/datasets/")
        assert answer.status_code == 503 and answer.json()["error"] == "unavailable"
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "failing: OperationalError"
        for text in (answer.text, ready.text):
            assert "s3cret" not in text and "127.0.0.1" not in text


def test_unexpected_errors_are_a_fixed_500(
    engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.store import queries

    def broken(*_args: object) -> None:
        raise RuntimeError("postgresql://admin:s3cret-pw@db/x")

    monkeypatch.setattr(queries, "list_dataset_ids", broken)
    with TestClient(create_app(engine, staging, lambda key: None), raise_server_exceptions=False) as c:
        answer = c.get("/api/v0/datasets/")
    assert answer.status_code == 500 and answer.json()["error"] == "internal"
    assert "s3cret" not in answer.text and "RuntimeError" not in answer.text


def test_a_refused_completion_changes_nothing(engine: Engine, staging: Staging) -> None:
    import redis as redis_lib

    from worker.keys import Keys

    complete(engine, staging, V1)
    dead = Staging(redis_lib.Redis(port=1, socket_connect_timeout=0.2), Keys("dead"))
    event = {
        "type": "dataset_version_created",
        "data": {"version": {"uri": "dataset://press/v2"}, "inputs": ["dataset://press/v1"]},
    }
    with TestClient(create_app(engine, dead, lambda key: None)) as c:
        assert c.post("/webhooks/events", json=event).status_code == 503
        (version,) = c.get("/api/v0/dataset-versions/").json()["results"]
    # Answered with an error: the input's last-used mark must not have been written either.
    assert "valohai.last-used" not in version["properties"]


def test_openapi_names_the_token_when_one_is_set(engine: Engine, staging: Staging) -> None:
    with TestClient(create_app(engine, staging, lambda key: None, api_token="t0ken")) as c:
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["token"]["name"] == "Authorization"
    assert spec["paths"]["/api/v0/datasets/"]["get"]["security"] == [{"token": []}]
    assert "security" not in spec["paths"]["/webhooks/events"]["post"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)  # validation errors are 400/404


def test_a_write_answered_503_is_never_applied_later(
    client: TestClient, engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy.exc

    from worker import applying

    url = dataset_url(client, engine, staging)

    def database_gone(*_args: object) -> None:
        raise sqlalchemy.exc.OperationalError("apply", {}, Exception("connection lost"))

    monkeypatch.setattr(applying, "apply_target", database_gone)
    assert client.post(url, json={"ghost": 1}).status_code == 503
    monkeypatch.undo()
    # The database is back; the sweep (or any later line) applies the target again.
    apply_target(engine, staging, Target("dataset", "press"))
    assert "ghost" not in client.get(url).json()
    assert client.post(url, json={"real": 1}).json() == {"real": 1}
