"""Property definitions through the HTTP app, on both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from worker.api import create_app
from worker.staging import Staging

pytestmark = pytest.mark.redis
BASE = "/api/v0/property-definitions/"


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def test_put_get_list_replace_and_delete(client: TestClient) -> None:
    body = {"type": "string", "allowed_values": ["day", {"value": "night", "description": "22-06"}]}
    made = client.put(f"{BASE}shift/", json=body)
    assert made.status_code == 201, made.text
    shown = made.json()
    assert shown["key"] == "shift" and shown["enforcement"] == "warn"
    assert shown["scopes"] == ["dataset", "version", "datum"]
    assert shown["allowed_values"] == [
        {"value": "day", "description": ""},
        {"value": "night", "description": "22-06"},
    ]
    assert client.get(f"{BASE}shift/").json() == shown
    again = client.put(f"{BASE}shift/", json={**body, "enforcement": "reject", "key": "shift"})
    assert again.status_code == 200 and again.json()["enforcement"] == "reject"
    assert client.put(f"{BASE}a/b/", json={}).status_code == 201  # a key may hold a slash
    listed = client.get(BASE).json()
    assert listed["count"] == 2 and [d["key"] for d in listed["results"]] == ["a/b", "shift"]
    assert client.delete(f"{BASE}shift/").status_code == 204
    gone = client.get(f"{BASE}shift/")
    assert gone.status_code == 404 and gone.json()["error"] == "not_found"
    assert client.delete(f"{BASE}shift/").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "uuid"}, "type"),
        ({"scopes": ["execution"]}, "scopes"),
        ({"type": "integer", "allowed_values": [1, "two"]}, "allowed_values[1]"),
        ({"type": "integer", "allowed_values": [1, 1.5]}, "allowed_values[1]"),
        ({"enforcement": "block"}, "enforcement"),
        ([1], "definition"),
    ],
)
def test_a_bad_definition_is_a_400_naming_the_field_and_changes_nothing(
    client: TestClient, body: object, field: str
) -> None:
    client.put(f"{BASE}k/", json={"type": "string"})
    answer = client.put(f"{BASE}k/", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and answer.json()["detail"].startswith(field)
    assert client.get(f"{BASE}k/").json()["type"] == "string"
    assert (
        client.put(f"{BASE}k/", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    )


def test_a_body_naming_another_key_is_a_conflict(client: TestClient) -> None:
    answer = client.put(f"{BASE}k/", json={"key": "other"})
    assert answer.status_code == 409 and answer.json()["field"] == "key"
    assert client.get(f"{BASE}k/").status_code == 404
