"""Saved searches through the HTTP app, on both databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from worker.api import create_app
from worker.ids import looks_like_id
from worker.staging import Staging

pytestmark = pytest.mark.redis


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def test_save_list_get_and_delete(client: TestClient) -> None:
    body = {
        "name": "night shifts",
        "scope": "dataset-versions",
        "filter": 'shift = "night" and sample_count > 4000',
        "columns": ["shift", "sample_count"],
        "ordering": "-properties.sample_count",
    }
    answer = client.post("/api/v0/saved-searches/", json=body)
    assert answer.status_code == 201, answer.text
    made = answer.json()
    assert looks_like_id(made["id"]) and made["url"] == f"/dataset-versions/?search={made['id']}"
    assert {k: made[k] for k in body} == body
    again = client.post("/api/v0/saved-searches/", json=body)
    assert again.status_code == 409 and again.json()["id"] == made["id"]
    other = client.post("/api/v0/saved-searches/", json={"name": "night shifts", "scope": "datasets"})
    assert other.status_code == 201  # names are per list
    listed = client.get("/api/v0/saved-searches/", params={"scope": "dataset-versions"}).json()
    assert [s["id"] for s in listed["results"]] == [made["id"]]
    assert client.get("/api/v0/saved-searches/").json()["count"] == 2
    assert client.get(f"/api/v0/saved-searches/{made['id']}/").json() == made
    assert client.delete(f"/api/v0/saved-searches/{made['id']}/").status_code == 204
    assert client.get(f"/api/v0/saved-searches/{made['id']}/").status_code == 404
    assert client.delete(f"/api/v0/saved-searches/{made['id']}/").status_code == 404


def test_a_bad_saved_search_is_refused_naming_the_field(client: TestClient) -> None:
    base = {"name": "x", "scope": "datasets"}
    for change, field in (
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "n" * 256}, "name"),
        ({"scope": "everything"}, "scope"),
        ({"columns": "a,b"}, "columns"),
        ({"columns": [""]}, "columns"),
        ({"columns": None}, "columns"),
        ({"filter": None}, "filter"),
        ({"ordering": None}, "ordering"),
    ):
        answer = client.post("/api/v0/saved-searches/", json={**base, **change})
        assert answer.status_code == 400, (change, answer.text)
        assert answer.json()["key"] == field
    bad_filter = client.post("/api/v0/saved-searches/", json={**base, "filter": "a >"})
    assert bad_filter.status_code == 400 and bad_filter.json()["error"] == "bad_filter"
    bad_order = client.post("/api/v0/saved-searches/", json={**base, "ordering": "properties."})
    assert bad_order.status_code == 400 and bad_order.json()["error"] == "bad_filter"
    assert client.get("/api/v0/saved-searches/").json()["count"] == 0
