"""The web pages in-process (TestClient): shells render, static files are served, unknown ids are
404 pages, the token guards the data and not the pages, and the staged-entry count is right."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.records import Entry, Source
from worker.staging import Staging
from worker.uris import Target
from worker.web import STATIC, staged_after_watermark

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")
TOKEN = "web-test-token"


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def stage(staging: Staging, *lines: bytes) -> None:
    staging.stage_lines(
        "exec-1/valohai.metadata.jsonl", "exec-1", [outcome(raw, n) for n, raw in enumerate(lines, 1)], "s"
    )


def complete(engine: Engine, staging: Staging, target: Target = V1) -> None:
    for key in staging.complete_version(target):
        apply_target(engine, staging, Target.parse(key))


def ids(client: TestClient) -> tuple[int, int]:
    (version,) = client.get("/api/v0/dataset-versions/").json()["results"]
    return version["dataset"]["id"], version["id"]


def assert_page(html: str, *landmarks: str) -> None:
    assert html.startswith("<!doctype html>")
    assert '<main id="main"' in html and 'aria-label="Main"' in html
    for landmark in landmarks:
        assert landmark in html, landmark
    # Every form control the shells render has a label (inline JS-built ones are labelled in app.js).
    for control in re.findall(r'<(?:input|select|textarea)[^>]*\bid="([^"]+)"', html):
        assert f'for="{control}"' in html, f"#{control} has no label"


def test_pages_render(client: TestClient, engine: Engine, staging: Staging) -> None:
    stage(staging, b'{"dataset-version": "dataset://press/v1", "metadata": {"shift": "night-shift"}}')
    complete(engine, staging)
    dataset_id, version_id = ids(client)

    home = client.get("/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert_page(home.text, "<h1>Datasets</h1>", 'role="search"', 'id="filter"', 'id="column-chooser"')
    assert 'data-kind="datasets"' in home.text
    assert "script-src 'self'" in home.headers["content-security-policy"]

    versions = client.get("/dataset-versions/")
    assert versions.status_code == 200
    assert_page(versions.text, "<h1>Dataset versions</h1>", 'id="dataset"', 'data-kind="dataset-versions"')

    dataset = client.get(f"/datasets/{dataset_id}/")
    assert dataset.status_code == 200
    assert_page(
        dataset.text, ">Properties</h2>", ">Edit properties</button>", ">Versions</h2>", ">History</h2>"
    )
    assert f'data-id="{dataset_id}"' in dataset.text

    version = client.get(f"/dataset-versions/{version_id}/")
    assert version.status_code == 200
    assert_page(
        version.text, ">Properties</h2>", ">Files</h2>", ">History</h2>", 'id="status"', 'id="staged"'
    )
    # A shell holds no data: everything is fetched from the API by the script.
    assert "night-shift" not in version.text and "dataset://press" not in version.text


def test_static_files_are_served(client: TestClient) -> None:
    home = client.get("/").text
    for name, kind in (("app.css", "text/css"), ("app.js", "javascript"), ("favicon.svg", "image/svg+xml")):
        (url,) = re.findall(rf'"(/static/{re.escape(name)}\?v=[0-9a-f]+)"', home)
        answer = client.get(url)
        assert answer.status_code == 200 and kind in answer.headers["content-type"]
        assert answer.content == (STATIC / name).read_bytes()
    assert client.get("/static/nope.js").status_code == 404


@pytest.mark.parametrize(
    "path", ["/datasets/99/", "/dataset-versions/99/", "/datasets/abc/", "/dataset-versions/-1/"]
)
def test_unknown_ids_are_404_pages(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert "<h1>Not found</h1>" in answer.text


def test_token_guards_data_not_pages(engine: Engine, staging: Staging) -> None:
    complete(engine, staging)
    app = create_app(engine, staging, lambda _key: None, api_token=TOKEN)
    with TestClient(app) as client:
        auth = {"Authorization": f"Token {TOKEN}"}
        (version,) = client.get("/api/v0/dataset-versions/", headers=auth).json()["results"]
        for page in ("/", "/dataset-versions/", f"/dataset-versions/{version['id']}/", "/static/app.js"):
            assert client.get(page).status_code == 200, page
        staged = f"/api/web/dataset-versions/{version['id']}/staged/"
        assert client.get(staged).status_code == 401
        assert client.get(staged, headers=auth).status_code == 200


def test_staged_count_follows_the_watermark(client: TestClient, engine: Engine, staging: Staging) -> None:
    stage(
        staging,
        b'{"dataset-version": "dataset://press/v1", "metadata": {"a": 1}}',
        b'{"dataset-version": "dataset://press/v1", "metadata": {"b": 2}}',
        b'{"dataset": "dataset://press", "metadata": {"domain": "x"}}',
    )
    apply_target(engine, staging, V1)  # registers the version as building; nothing applied
    dataset_id, version_id = ids(client)
    url = f"/api/web/dataset-versions/{version_id}/staged/"
    want = {"target": V1.key, "watermark": None, "staged": 2, "capped": False, "quarantined": None}
    assert client.get(url).json() == want
    assert client.get(f"/api/web/datasets/{dataset_id}/staged/").json()["staged"] == 1

    # An API write on a building version is staged too.
    assert client.post(f"/api/v0/dataset-versions/{version_id}/metadata/", json={"c": 3}).status_code == 202
    assert client.get(url).json()["staged"] == 3

    complete(engine, staging)
    answer = client.get(url).json()
    assert answer["staged"] == 0 and answer["watermark"] is not None
    assert client.get(f"/api/web/datasets/{dataset_id}/staged/").json()["staged"] == 0

    # A line staged after completion counts until it is applied (no worker runs here).
    staging.stage_entry(Entry(V1, "set", Source("api"), {"late": True}))
    assert client.get(url).json()["staged"] == 1


def test_staged_count_is_capped(engine: Engine, staging: Staging) -> None:
    stage(
        staging, *[b'{"dataset-version": "dataset://press/v1", "metadata": {"n": %d}}' % i for i in range(5)]
    )
    counted = staged_after_watermark(engine, staging, V1, cap=3)
    assert (counted.count, counted.capped) == (3, True)


def test_staged_count_of_unknown_ids_is_404(client: TestClient) -> None:
    answer = client.get("/api/web/dataset-versions/99/staged/")
    assert answer.status_code == 404 and answer.json()["error"] == "not_found"
