"""Definitions × enforcement × scope in the apply and the API, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests import oracle
from tests.helpers import outcome
from worker.api import create_app
from worker.applying import apply_target
from worker.definitions import parse
from worker.staging import Staging
from worker.store import definitions as stored
from worker.store.models import Dataset, DatasetVersion, Datum
from worker.uris import Target

pytestmark = pytest.mark.redis

V1 = Target("version", "press", "v1")
FILE = "exec-1/valohai.metadata.jsonl"


def define(engine: Engine, *bodies: dict[str, Any]) -> None:
    stored.apply_definitions(engine, [parse(b) for b in bodies])


def stage(staging: Staging, *lines: bytes) -> None:
    staging.stage_lines(FILE, "exec-1", [outcome(raw, n) for n, raw in enumerate(lines, 1)], "s")


def version(engine: Engine) -> DatasetVersion:
    with Session(engine) as s:
        row = s.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
        assert row is not None
        return row


def complete(engine: Engine, staging: Staging) -> None:
    for key in staging.complete_execution("exec-1"):
        apply_target(engine, staging, Target.parse(key))
    for key in staging.complete_version(V1):
        apply_target(engine, staging, Target.parse(key))


def test_reject_drops_that_key_and_records_file_line_and_reason(engine: Engine, staging: Staging) -> None:
    define(engine, {"key": "shift", "allowed_values": ["day", "night"], "enforcement": "reject"})
    stage(
        staging,
        b'{"dataset-version": "dataset://press/v1", "metadata": {"shift": "dusk", "n": 1}}',
        b'{"dataset-version": "dataset://press/v1", "metadata": {"shift": "night"}}',
    )
    complete(engine, staging)
    row = version(engine)
    assert row.properties == {"n": 1, "shift": "night"}  # the rest of the rejected line applied
    assert row.violations == []
    (reject,) = staging.rejects(10)
    assert (reject.file, reject.line, reject.offset) == (FILE, 1, 0)
    assert "'shift'" in reject.reason and "allowed_values" in reject.reason


def test_warn_stores_the_value_and_the_owner_carries_the_violation(engine: Engine, staging: Staging) -> None:
    define(
        engine,
        {"key": "sample_count", "type": "integer", "scopes": ["version"], "required": True},
        {"key": "camera", "allowed_values": ["top"], "scopes": ["datum"]},
        {"key": "domain", "type": "string", "scopes": ["dataset"]},
    )
    stage(
        staging,
        b'{"dataset": "dataset://press", "metadata": {"domain": 7}}',
        b'{"dataset-version": "dataset://press/v1", "metadata": {"sample_count": "many"}}',
        b'{"file": "a.png", "metadata": {"camera": "side", "sample_count": "x", '
        b'"valohai.dataset-versions": ["dataset://press/v1"]}}',
    )
    complete(engine, staging)
    assert version(engine).violations == [{"key": "sample_count", "rule": "type", "value": "many"}]
    with Session(engine) as s:
        datum = s.scalar(select(Datum))
        dataset = s.scalar(select(Dataset))
        assert datum is not None and dataset is not None
        # the version-scoped definition does not apply to a datum's sample_count
        assert datum.violations == [{"key": "camera", "rule": "allowed_values", "value": "side"}]
        assert dataset.violations == [{"key": "domain", "rule": "type", "value": 7}]
    assert staging.rejects(10) == []


def test_required_is_checked_when_a_version_completes(engine: Engine, staging: Staging) -> None:
    define(engine, {"key": "sample_count", "scopes": ["version"], "required": True})
    stage(staging, b'{"dataset-version": "dataset://press/v1", "metadata": {"n": 1}}')
    apply_target(engine, staging, V1)  # registered, building: nothing is missing yet
    assert version(engine).violations == []
    complete(engine, staging)
    assert version(engine).violations == [{"key": "sample_count", "rule": "required", "value": None}]


def test_a_definition_change_is_seen_by_the_next_apply(engine: Engine, staging: Staging) -> None:
    stage(staging, b'{"dataset-version": "dataset://press/v1", "metadata": {"n": "one"}}')
    complete(engine, staging)  # no definition yet: free-form
    define(engine, {"key": "n", "type": "integer", "enforcement": "reject"})
    staging.stage_lines(
        FILE,
        "exec-1",
        [outcome(b'{"dataset-version": "dataset://press/v1", "metadata": {"n": "two"}}', 2)],
        "s",
    )
    apply_target(engine, staging, V1)
    assert version(engine).properties == {"n": "one"}
    assert [r.line for r in staging.rejects(10)] == [2]


@pytest.fixture
def client(engine: Engine, staging: Staging) -> Iterator[TestClient]:
    with TestClient(create_app(engine, staging, lambda _key: None)) as c:
        yield c


def test_an_api_write_breaking_a_reject_definition_is_a_400_naming_key_and_rule(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    made = client.post("/api/v0/datasets/", json={"name": "press"})
    assert made.status_code in (200, 201), made.text
    dataset_id = made.json()["id"]
    client.put("/api/v0/property-definitions/line/", json={"type": "integer", "enforcement": "reject"})
    client.put("/api/v0/property-definitions/owner/", json={"type": "string"})
    url = f"/api/v0/datasets/{dataset_id}/metadata/"
    refused = client.post(url, json={"line": "four", "other": 1})
    assert refused.status_code == 400 and refused.json()["key"] == "line"
    assert "type" in refused.json()["detail"]
    assert client.get(url).json() == {}  # nothing of it was applied, or staged
    assert client.post(url, json={"line": 4, "owner": 5}).status_code == 200
    with Session(engine) as s:
        row = s.scalar(select(Dataset))
        assert row is not None and row.violations == [{"key": "owner", "rule": "type", "value": 5}]


FILTERS = [
    "violates",
    "not violates",
    "violates shift",
    "violates `n`",
    'violates n and shift = "dusk"',
    "violates shift or violates n",
    "violates a.b",
    "violates nothing",
    "exists shift and not violates shift",
]


@pytest.mark.parametrize("cap", [None, 0])
def test_violates_in_the_filter_language_agrees_with_matches(
    engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch, cap: int | None
) -> None:
    from worker.query import Violates, matches, render
    from worker.query import parse as parse_filter
    from worker.store import queries, search

    if cap is not None:  # no part selective: the database evaluates the whole filter
        monkeypatch.setattr(search, "CAP", cap)
    define(
        engine,
        {"key": "shift", "allowed_values": ["day", "night"]},
        {"key": "n", "type": "integer"},
    )
    values = [
        '{"shift": "dusk"}',
        '{"shift": "day", "n": "x"}',
        '{"shift": "night", "n": 2}',
        '{"n": 1.5}',
        "{}",
    ]
    for i, meta in enumerate(values):
        uri = f"dataset://press/v{i}"
        line = b'{"dataset-version": "%s", "metadata": %s}' % (uri.encode(), meta.encode())
        staging.stage_lines(FILE, "exec-1", [outcome(line, i + 1)], "s")
        for key in staging.complete_version(Target("version", "press", f"v{i}")):
            apply_target(engine, staging, Target.parse(key))
    with Session(engine) as s:
        rows = s.scalars(select(DatasetVersion)).all()
        assert sum(1 for r in rows if r.violations) == 3
        for text in FILTERS:
            node = parse_filter(text)
            assert parse_filter(render(node)) == node
            expected = sorted(r.name for r in rows if matches(node, r.properties, r.violations))
            _, found = queries.list_versions(s, queries.ListQuery(filter=text, limit=100))
            assert sorted(r.name for r in found) == expected, text
    assert parse_filter("violates") == Violates(None)
    assert expected == ["v1", "v2"]  # the last filter: a shift that breaks nothing


def test_the_api_objects_carry_their_violations(client: TestClient, engine: Engine, staging: Staging) -> None:
    define(engine, {"key": "n", "type": "integer"}, {"key": "owner", "required": True, "scopes": ["dataset"]})
    stage(
        staging,
        b'{"dataset-version": "dataset://press/v1", "metadata": {"n": "x"}}',
        # `required` of a dataset or datum is checked when its properties are written
        b'{"dataset": "dataset://press", "metadata": {"domain": "x"}}',
    )
    complete(engine, staging)
    (listed,) = client.get("/api/v0/dataset-versions/").json()["results"]
    assert listed["violations"] == [{"key": "n", "rule": "type", "value": "x"}]
    assert (
        client.get(f"/api/v0/dataset-versions/{listed['id']}/").json()["violations"] == listed["violations"]
    )
    (dataset,) = client.get("/api/v0/datasets/").json()["results"]
    assert dataset["violations"] == [{"key": "owner", "rule": "required", "value": None}]
    found = client.get("/api/v0/dataset-versions/", params={"filter": "violates n"}).json()
    assert found["count"] == 1


def test_recheck_brings_stored_violations_up_to_date(engine: Engine, staging: Staging) -> None:
    stage(
        staging,
        b'{"dataset-version": "dataset://press/v1", "metadata": {"n": "x"}}',
        b'{"file": "a.png", "metadata": {"n": 1, "valohai.dataset-versions": ["dataset://press/v1"]}}',
    )
    complete(engine, staging)  # no definitions: nothing violates
    define(engine, {"key": "n", "type": "string"})
    assert stored.count_violations(engine) == stored.Rechecked(checked=3, changed=1, violating=1)
    assert version(engine).violations == []
    assert stored.recheck(engine, batch=1) == stored.Rechecked(checked=3, changed=1, violating=1)
    with Session(engine) as s:
        datum = s.scalar(select(Datum))
        assert datum is not None and datum.violations == [{"key": "n", "rule": "type", "value": 1}]
    stored.remove(engine, "n")
    assert stored.recheck(engine).changed == 1
    assert stored.recheck(engine).changed == 0
    with Session(engine) as s:
        assert [r.violations for r in s.scalars(select(Datum))] == [[]]


def test_datums_show_violations_are_searchable_and_api_writes_are_refused(
    client: TestClient, engine: Engine, staging: Staging
) -> None:
    define(
        engine,
        {"key": "camera", "allowed_values": ["top"], "scopes": ["datum"]},
        {"key": "lens", "type": "string", "scopes": ["datum"], "enforcement": "reject"},
    )
    stage(
        staging,
        b'{"file": "a.png", "metadata": {"camera": "side", "valohai.dataset-versions": ["dataset://press/v1"]}}',
        b'{"file": "b.png", "metadata": {"camera": "top", "valohai.dataset-versions": ["dataset://press/v1"]}}',
    )
    complete(engine, staging)
    found = client.get("/api/v0/data/", params={"filter": "violates camera"}).json()
    assert [d["name"] for d in found["results"]] == ["a.png"]
    assert found["results"][0]["violations"] == [{"key": "camera", "rule": "allowed_values", "value": "side"}]
    datum_id = found["results"][0]["id"]
    refused = client.post(f"/api/v0/data/{datum_id}/metadata/", json={"lens": 35})
    assert refused.status_code == 400 and refused.json()["key"] == "lens"
    bulk = client.post("/api/v0/data/metadata/apply/", json={"datum_metadata": {datum_id: {"lens": 35}}})
    assert bulk.status_code == 400 and bulk.json()["key"] == "lens"
    assert client.post(f"/api/v0/data/{datum_id}/metadata/", json={"camera": "top"}).status_code == 200
    assert client.get("/api/v0/data/", params={"filter": "violates"}).json()["count"] == 0


KEYS = ("a", "b", "c", "d")
VALUES: list[Any] = [None, 1, 2, 1.5, "1", "x", "y", "z", True, "2026-01-15", [1], {"k": 1}]
ALLOWED = {None: ["x", "y", 1], "integer": [1, 2], "string": ["x", "y"], "number": [1, 1.5]}


def random_definitions(rng: Any) -> list[dict[str, Any]]:
    """A definition for some keys: any scopes, type, allowed values of that type, `required`
    and enforcement; the other keys stay free-form."""
    out = []
    for key in rng.sample(KEYS, rng.randint(1, len(KEYS))):
        kind = rng.choice([None, "integer", "string", "number", "boolean", "date"])
        body: dict[str, Any] = {
            "key": key,
            "scopes": rng.sample(["dataset", "version", "datum"], rng.randint(1, 3)),
            "enforcement": rng.choice(["warn", "reject"]),
            "required": rng.random() < 0.3,
        }
        if kind is not None:
            body["type"] = kind
        if kind in ALLOWED and rng.random() < 0.5:
            body["allowed_values"] = ALLOWED[kind]
        out.append(body)
    return out


def random_lines(rng: Any) -> list[bytes]:
    """Lines for the dataset, its version v1 and two datums, each setting some of the keys."""
    heads = [
        '"dataset": "dataset://press"',
        '"dataset-version": "dataset://press/v1"',
        '"file": "a.png"',
        '"file": "b.png"',
    ]
    lines = []
    for _ in range(rng.randint(1, 16)):
        meta = {k: rng.choice(VALUES) for k in rng.sample(KEYS, rng.randint(1, 3))}
        lines.append(b'{%s, "metadata": %s}' % (rng.choice(heads).encode(), json.dumps(meta).encode()))
    return lines


@pytest.mark.parametrize("seed", range(20))
def test_random_definitions_and_lines_against_the_oracle(engine: Engine, staging: Staging, seed: int) -> None:
    """Definitions × enforcement × scope: the database holds the oracle's fold, in which a change
    that a `reject` definition refuses is absent and a `warn` one is present with its violation;
    every refused change is a reject naming its line."""
    import random

    rng = random.Random(seed)
    bodies = random_definitions(rng)
    define(engine, *bodies)
    raws = random_lines(rng)
    stage(staging, *raws)
    complete(engine, staging)
    known = {b["key"]: b for b in bodies}
    expected = oracle.expected_state({FILE: raws}, definitions=known)
    oracle.assert_matches_db(engine, expected, completed=[V1.key], definitions=known)
    refused = sorted(
        n
        for n, raw in enumerate(raws, 1)
        for target, meta in oracle.classify(raw, "exec-1")
        if any(
            oracle.broken_rule(known[k], v)
            and known[k]["enforcement"] == "reject"
            and oracle.scope_of(target) in known[k]["scopes"]
            for k, v in meta.items()
            if k in known and v is not None
        )
    )
    assert sorted({r.line for r in staging.rejects(100)}) == sorted(set(refused)), raws
