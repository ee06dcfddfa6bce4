"""Subscriptions and their delivery log through the HTTP app, on both databases."""

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
BASE = "/api/v0/subscriptions/"
SECRET = "t0p-s3cret"
BODY: dict[str, object] = {
    "url": "https://hooks.example.com/in",
    "events": ["property.changed"],
    "secret": SECRET,
}


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def test_create_get_list_and_delete_never_showing_the_secret(client: TestClient) -> None:
    made = client.post(BASE, json={**BODY, "filter": 'shift = "night"'})
    assert made.status_code == 201, made.text
    shown = made.json()
    assert set(shown) == {"id", "url", "events", "filter", "created_at"}
    assert shown["url"] == BODY["url"] and shown["filter"] == 'shift = "night"'
    assert client.get(f"{BASE}{shown['id']}/").json() == shown
    listed = client.get(BASE).json()
    assert listed["count"] == 1 and listed["results"] == [shown]
    for answer in (made, client.get(BASE), client.get(f"{BASE}{shown['id']}/")):
        assert SECRET not in answer.text
    assert client.delete(f"{BASE}{shown['id']}/").status_code == 204
    assert client.get(f"{BASE}{shown['id']}/").status_code == 404
    assert client.delete(f"{BASE}{shown['id']}/").status_code == 404
    assert client.get(f"{BASE}not-an-id/").status_code == 404


def test_delete_on_the_list_removes_every_subscription(client: TestClient) -> None:
    for n in range(3):
        assert client.post(BASE, json={**BODY, "url": f"http://127.0.0.1:{8000 + n}/"}).status_code == 201
    assert client.delete(BASE).status_code == 204
    assert client.get(BASE).json()["count"] == 0


@pytest.mark.parametrize(
    "url", ["ftp://example.com/in", "file:///etc/passwd", "javascript:alert(1)", "example.com", "http://"]
)
def test_a_url_that_is_not_http_or_https_is_a_400(client: TestClient, url: str) -> None:
    answer = client.post(BASE, json={**BODY, "url": url})
    assert answer.status_code == 400 and answer.json()["key"] == "url"
    assert client.get(BASE).json()["count"] == 0


def test_a_bad_filter_is_a_400_with_its_position_as_the_list_endpoints_answer(client: TestClient) -> None:
    answer = client.post(BASE, json={**BODY, "filter": "shift = "})
    listed = client.get("/api/v0/datasets/", params={"filter": "shift = "})
    assert answer.status_code == listed.status_code == 400
    assert answer.json()["error"] == "bad_filter" == listed.json()["error"]
    assert answer.json()["position"] == listed.json()["position"] == 8
    assert client.get(BASE).json()["count"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {**BODY, "events": ["nope"]},
        {**BODY, "secret": ""},
        {k: v for k, v in BODY.items() if k != "secret"},
        {**BODY, "filter": 'a = "\x00"'},
        [BODY],
    ],
)
def test_a_bad_body_is_a_400(client: TestClient, body: object) -> None:
    assert client.post(BASE, json=body).status_code == 400
    assert client.post(BASE, content=b"{", headers={"Content-Type": "application/json"}).status_code == 400


def test_the_delivery_log_pages_newest_first(client: TestClient, engine: Engine, staging: Staging) -> None:
    sub = client.post(BASE, json={**BODY, "events": ["property.changed", "version.completed"]}).json()
    lines = [outcome(b'{"dataset-version": "dataset://p/v1", "metadata": {"a": 1}}')]
    staging.stage_lines("exec-1/valohai.metadata.jsonl", "exec-1", lines, "s")
    staging.complete_version(Target("version", "p", "v1"))
    apply_target(engine, staging, Target("version", "p", "v1"))
    page = client.get(f"{BASE}{sub['id']}/deliveries/", params={"limit": 1})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["count"] == 2 and len(body["results"]) == 1 and body["next"] and body["previous"] is None
    first = body["results"][0]
    assert first["status"] == "pending" and first["attempts"] == 0 and first["next_at"]
    assert first["event"]["uri"] == "dataset://p/v1" and first["event"]["target"] == "dataset://p/v1"
    rest = client.get(body["next"]).json()
    assert len(rest["results"]) == 1 and rest["next"] is None and rest["results"][0]["id"] < first["id"]
    assert {first["event"]["type"], rest["results"][0]["event"]["type"]} == {
        "property.changed",
        "version.completed",
    }
    failed = client.get(f"{BASE}{sub['id']}/deliveries/", params={"status": "failed"}).json()
    assert failed["count"] == 0
    assert client.get(f"{BASE}{sub['id']}/deliveries/", params={"status": "lost"}).status_code == 400
    missing = "01900000-0000-7000-8000-000000000000"
    assert client.get(f"{BASE}{missing}/deliveries/").status_code == 404
