"""Bulk edits by filter: the request's checks, the dry run, and the edit itself against the
oracle's fold with the bulk write inserted at its place, on real Redis and both databases,
targets still building included."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from tests import oracle
from tests.helpers import outcome
from tests.test_props_cli import run as run_cli
from tests.test_quarantine import _cure, _poison
from tests.test_rollback import _apply_due, _reset
from worker import bulk
from worker.api import create_app
from worker.api_bulk import inline_runner
from worker.applying import apply_targets, roll_back
from worker.errors import InvalidEntry, ReservedKey
from worker.query import FilterError, matches, parse
from worker.settings import Settings
from worker.staging import Staging
from worker.store import bulk as store_bulk
from worker.store.models import PropertyChange
from worker.tasks import make_app, retry_targets, run_bulk
from worker.uris import Target

pytestmark = pytest.mark.redis

VERSIONS = ("v0", "v1", "v2", "v3")
COMPLETED = ("v0", "v1")  # before the edit; v2 and v3 complete after it
_JSON = {"Content-Type": "application/json"}


# -- the request ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"set": {"a": 1}}, "filter"),  # alone it would edit everything
        ({"filter": "  ", "set": {"a": 1}}, "filter"),
        ({"filter": 'a = "x"'}, "set"),
        ({"filter": 'a = "x"', "set": {}}, "set"),
        ({"filter": 'a = "x"', "set": [1]}, "set"),
        ({"filter": 'a = "x"', "set": {"a": 1}, "dry_run": "yes"}, "dry_run"),
        ({"filter": 'a = "x"', "set": {"a": 1}, "confirm": True}, "confirm"),
        ({"filter": 'a = "x"', "set": {"a": 1}, "everything": True}, "everything"),
        ({"filter": 'a = "x"', "set": {"": 1}}, ""),
    ],
)
def test_a_request_names_the_field_that_is_wrong(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEntry) as caught:
        bulk.checked("version", body)
    assert caught.value.key == field, caught.value


def test_a_filter_that_does_not_parse_says_where_and_reserved_keys_are_refused() -> None:
    with pytest.raises(FilterError) as caught:
        bulk.checked("version", {"filter": 'a = "x" and', "set": {"a": 1}})
    assert caught.value.position == 11
    with pytest.raises(ReservedKey):
        bulk.checked("version", {"filter": "exists a", "set": {"valohai.tags": ["x"]}})
    # A datum may be tagged, as its own write may.
    assert bulk.checked("datum", {"filter": "exists a", "set": {"valohai.tags": ["x"]}}).changes


def test_changes_of_lists_what_really_changes() -> None:
    props = {"a": 1, "b": "x", "t": True}
    changes = {"a": 1, "b": "y", "c": None, "t": 1, "n": 2, "a2": None}
    assert bulk.changes_of(props, changes) == [
        {"key": "b", "old": "x", "new": "y"},
        {"key": "t", "old": True, "new": 1},  # 1 is not true
        {"key": "n", "old": None, "new": 2},
    ]
    assert bulk.changes_of(props, {"b": None}) == [{"key": "b", "old": "x", "new": None}]


# -- against the oracle ---------------------------------------------------------------------------

KEYS = st.sampled_from(["k0", "k1", "k2"])
WHERE = st.sampled_from(["dataset", *VERSIONS, "datum-a", "datum-b"])
LINE = st.tuples(WHERE, st.dictionaries(KEYS, st.sampled_from(["a", "b", None]), min_size=1))
FILTERS = st.sampled_from(['k0 = "a"', "not exists k0", 'k1 = "b" or k2 = "a"', "exists k2", "not k1 = 0"])
EDIT = st.tuples(
    st.sampled_from(["dataset", "version", "datum"]),
    FILTERS,
    st.dictionaries(KEYS, st.sampled_from(["bulk", 7, None]), min_size=1),
)


def _doc(where: str, metadata: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(execution, line) for a line aimed at `where`."""
    if where == "dataset":
        return "exec-a", {"dataset": "dataset://press", "metadata": metadata}
    if where.startswith("datum-"):
        return f"exec-{where[-1]}", {"file": "f.csv", "metadata": metadata}
    return "exec-a", {"dataset-version": f"dataset://press/{where}", "metadata": metadata}


def _stage(staging: Staging, name: str, lines: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, bytes]]:
    """Stage the lines, one file per execution named `name`: (execution, raw) in order."""
    staged = []
    for execution in ("exec-a", "exec-b"):
        raws = [orjson.dumps(doc) for e, doc in lines if e == execution]
        if raws:
            outcomes = [outcome(r, i, execution) for i, r in enumerate(raws, 1)]
            staging.stage_lines(f"{execution}/{name}", execution, outcomes, "s")
            staged += [(execution, r) for r in raws]
    return staged


def _fold(state: dict[str, dict[str, Any]], staged: list[tuple[str, bytes]]) -> None:
    for execution, raw in staged:
        for target, metadata in oracle.classify(raw, execution):
            oracle.fold_into(state.setdefault(target, {}), metadata)


def _kind_of(key: str) -> str:
    if key.startswith("datum:"):
        return "datum"
    return "version" if key.count("/") == 3 else "dataset"


@hsettings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(LINE, max_size=8), after=st.lists(LINE, max_size=4), edit=EDIT)
# A version still building matches (it holds nothing yet): the edit waits for its completion,
# after its lines, and a line written after the edit wins over it.
@example(
    before=[("v2", {"k0": "a"}), ("v0", {"k1": "a"})],
    after=[("v2", {"k1": "b"}), ("v0", {"k1": "b"})],
    edit=("version", "not exists k0", {"k0": "bulk", "k1": 7}),
)
@example(
    before=[("datum-a", {"k0": "a"}), ("datum-b", {"k0": "a"}), ("dataset", {"k0": "a"})],
    after=[("datum-a", {"k0": None})],
    edit=("datum", 'k0 = "a"', {"k2": "bulk", "k0": None}),
)
def test_a_bulk_edit_equals_the_fold_with_the_edit_at_its_place(
    engine: Engine,
    staging: Staging,
    before: list[tuple[str, dict[str, Any]]],
    after: list[tuple[str, dict[str, Any]]],
    edit: tuple[str, str, dict[str, Any]],
) -> None:
    _reset(engine, staging)
    kind, text, changes = edit
    first = _stage(staging, "valohai.metadata.jsonl", [_doc(w, m) for w, m in before])
    for name in COMPLETED:
        staging.complete_version(Target("version", "press", name))
    staging.complete_execution("exec-a")  # exec-b still runs: its datums are not applied yet
    _apply_due(engine, staging)
    expected: dict[str, dict[str, Any]] = {}
    _fold(expected, first)

    # What the filter matches: the reference evaluator over what the database holds now (a
    # version still building holds nothing yet; a datum of a running execution is not there).
    now, status = oracle.db_state(engine)
    for key, props in now.items():
        building = status.get(key) not in (None, "completed")
        running = key.startswith("datum:exec-b/")
        assert not running, "a datum of a running execution exists already"
        assert oracle.same(props, {} if building else expected.get(key, {})), key
    node = parse(text)
    matched = {key for key, props in now.items() if _kind_of(key) == kind and matches(node, props)}

    base = {"dataset": "datasets", "version": "dataset-versions", "datum": "data"}[kind]
    runner = inline_runner(engine, staging, batch=2)  # several batches even here
    with TestClient(create_app(engine, staging, lambda _: None, bulk_edit=runner, bulk_limit=2)) as client:
        url = f"/api/v0/{base}/metadata/bulk/"
        dry = client.post(url, json={"filter": text, "set": changes, "dry_run": True})
        assert dry.status_code == 200, dry.text
        preview = dry.json()
        assert preview["count"] == len(matched) and preview["needs_confirm"] == (len(matched) > 2)
        shown = {_preview_key(t): t["changes"] for t in preview["targets"]}
        assert shown == {k: bulk.changes_of(now[k], changes) for k in matched}
        assert oracle.db_state(engine) == (now, status)  # a dry run changes nothing

        answer = client.post(url, json={"filter": text, "set": changes})
        if len(matched) > 2:  # past the limit: the count must be confirmed
            assert answer.status_code == 400 and answer.json()["count"] == len(matched), answer.text
            answer = client.post(url, json={"filter": text, "set": changes, "confirm": len(matched)})
        assert answer.status_code == 202, answer.text
        done = client.get(answer.json()["url"]).json()
        assert done["state"] == "done" and done["total"] == done["done"] == len(matched), done
        stays = {k for k in matched if status.get(k) not in (None, "completed")}
        assert (done["applied"], done["staged"]) == (len(matched) - len(stays), len(stays))

    for key in matched:  # the edit at its place: after every line staged before it
        oracle.fold_into(expected.setdefault(key, {}), changes)
    late = _stage(staging, "late.metadata.jsonl", [_doc(w, m) for w, m in after])
    _fold(expected, late)
    for name in VERSIONS:
        staging.complete_version(Target("version", "press", name))
    staging.complete_execution("exec-a")
    staging.complete_execution("exec-b")
    _apply_due(engine, staging)
    held, _ = oracle.db_state(engine)
    assert set(expected) <= set(held)
    oracle.assert_matches_db(engine, {key: expected.get(key, {}) for key in held})
    assert staging.due_targets(older_than=-1) == []

    # History names the edit and its filter, and `made_by` its id (what a rollback looks up).
    with engine.connect() as conn:
        rows = conn.execute(select(PropertyChange.source, PropertyChange.made_by)).all()
    sources = [(s, m) for s, m in rows if s["origin"] == "bulk"]
    assert all(
        s == {"origin": "bulk", "id": done["id"], "filter": text} and m == done["id"] for s, m in sources
    )


def _preview_key(target: dict[str, Any]) -> str:
    if "path" in target:
        return oracle.datum_key(target["target"].removeprefix("execution:"), target["path"])
    return str(target["target"])


# -- the API around it, resuming, rolling back ----------------------------------------------------


def _versions(engine: Engine, staging: Staging, count: int) -> None:
    lines = [(f"v{i}", {"k0": "a", "n": i}) for i in range(count)]
    _stage(staging, "valohai.metadata.jsonl", [_doc(w, m) for w, m in lines])
    for i in range(count):
        staging.complete_version(Target("version", "press", f"v{i}"))
    _apply_due(engine, staging)


def test_the_api_refuses_what_it_cannot_do_and_answers_the_state(engine: Engine, staging: Staging) -> None:
    _versions(engine, staging, 3)
    with TestClient(create_app(engine, staging, lambda _: None, bulk_limit=2)) as client:
        url = "/api/v0/dataset-versions/metadata/bulk/"
        assert client.post(url, json={"set": {"a": 1}}).status_code == 400
        bad = client.post(url, json={"filter": "n >", "set": {"a": 1}})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_filter" and bad.json()["position"] == 3
        assert client.post(url, content=b"{", headers=_JSON).status_code == 400
        assert client.post(url, content=b"{}").status_code == 415
        refused = client.post(url, json={"filter": 'k0 = "a"', "set": {"z": 1}})
        assert refused.status_code == 400 and refused.json()["error"] == "confirm_required"
        assert refused.json()["count"] == 3 and refused.json()["limit"] == 2
        wrong = client.post(url, json={"filter": 'k0 = "a"', "set": {"z": 1}, "confirm": 2})
        assert wrong.status_code == 400
        answer = client.post(url, json={"filter": "n >= 1", "set": {"z": 1}})
        assert answer.status_code == 202 and answer.headers["location"] == answer.json()["url"]
        state = client.get(answer.json()["url"]).json()
        assert {k: state[k] for k in ("state", "total", "done", "applied", "staged", "kind")} == {
            "state": "done",
            "total": 2,
            "done": 2,
            "applied": 2,
            "staged": 0,
            "kind": "version",
        }
        assert state["set"] == {"z": 1} and state["filter"] == "n >= 1" and state["error"] is None
        versions = client.get("/api/v0/dataset-versions/?ordering=n").json()["results"]
        assert [v["properties"].get("z") for v in versions] == [None, 1, 1]
        (change,) = client.get(
            f"/api/v0/dataset-versions/{versions[1]['id']}/metadata/history/?offset=2"
        ).json()["results"]
        assert change["source"] == {"origin": "bulk", "id": state["id"], "filter": "n >= 1"}
        assert client.get("/api/v0/bulk/nothing/").status_code == 404
        assert client.get(f"/api/v0/bulk/{'0' * 8}-0000-7000-8000-{'0' * 12}/").status_code == 404
        schema = client.get("/openapi.json").json()["paths"]
        assert "/api/v0/data/metadata/bulk/" in schema and "/api/v0/bulk/{bulk_id}/" in schema


def test_an_edit_resumes_at_its_cursor_and_a_rollback_of_it_restores(
    engine: Engine, staging: Staging
) -> None:
    _versions(engine, staging, 5)
    asked = bulk.checked("version", {"filter": 'k0 = "a"', "set": {"k0": "b", "extra": True}})
    ident = bulk.create(engine, asked, limit=100)

    def apply(targets: list[Target]) -> None:
        apply_targets(engine, staging, targets)

    seen: list[int] = []
    # `seconds=0`: one batch per run, as a worker's task slices a long edit.
    while (
        edit := bulk.run(
            engine, staging, ident, apply, batch=2, seconds=0, progress=lambda e: seen.append(e.done)
        )
    ).state != "done":
        assert edit.state == "running"
    assert seen == [2, 4, 5, 5] and edit.done == 5 and edit.applied == 5
    # The filter is evaluated per batch: the edit changed `k0`, and still every version got it.
    props, _ = oracle.db_state(engine)
    assert all(props[f"dataset://press/v{i}"] == {"k0": "b", "n": i, "extra": True} for i in range(5))
    assert bulk.run(engine, staging, ident, apply).done == 5  # over: nothing more

    undo = roll_back(engine, staging, ident)  # the edit's id is its `made_by`
    assert undo.id is not None and sum(len(o.reverts) for o in undo.owners) == 10
    props, _ = oracle.db_state(engine)
    assert all(props[f"dataset://press/v{i}"] == {"k0": "a", "n": i} for i in range(5))


def test_a_failed_batch_leaves_nothing_staged_and_the_edit_resumes(engine: Engine, staging: Staging) -> None:
    """The batch's apply fails as a whole (the database went away): its entries are taken back,
    the cursor stays, and the run again applies that batch once."""
    _versions(engine, staging, 3)
    ident = bulk.create(engine, bulk.checked("version", {"filter": "exists n", "set": {"z": 1}}), limit=100)

    def broken(_targets: list[Target]) -> None:
        raise RuntimeError("the database went away")

    with pytest.raises(RuntimeError):
        bulk.run(engine, staging, ident, broken, batch=2)
    assert store_bulk.load(engine, ident).done == 0
    for i in range(3):
        entries = staging.snapshot(Target("version", "press", f"v{i}")).entries
        assert [e.source.origin for _, e in entries] == ["sidecar"]

    def apply(targets: list[Target]) -> None:
        apply_targets(engine, staging, targets)

    assert bulk.run(engine, staging, ident, apply, batch=2).state == "done"
    with engine.connect() as conn:
        made = conn.scalars(select(PropertyChange.key).where(PropertyChange.made_by == ident)).all()
    assert made == ["z", "z", "z"]


def test_the_cli_edits_by_filter_after_a_dry_run(
    settings: Settings,
    engine: Engine,
    staging: Staging,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    _versions(engine, staging, 3)
    before, _ = oracle.db_state(engine)
    assert run_cli(settings, "props", "set", "--filter", "n >= 1", "z=1", "shift=night", "--dry-run") == 0
    out = capsys.readouterr().out
    assert 'dataset://press/v1  z: - -> 1, shift: - -> "night"' in out and "2 matching" in out
    assert oracle.db_state(engine)[0] == before
    assert run_cli(settings, "props", "set", "--filter", "n >= 1", "z=1", "shift=night") == 0
    assert "2 of 2 targets, 2 changed now, 0 staged" in capsys.readouterr().out
    props, _ = oracle.db_state(engine)
    assert [props[f"dataset://press/v{i}"].get("z") for i in range(3)] == [None, 1, 1]
    assert run_cli(settings, "props", "unset", "--filter", "exists z", "z", "shift", "--json") == 0
    assert orjson.loads(capsys.readouterr().out)["done"] == 2
    assert oracle.db_state(engine)[0] == before
    # A filter with no key, a filter that does not parse: an error, nothing changed.
    assert run_cli(settings, "props", "set", "--filter", "n >= 1") == 1
    assert run_cli(settings, "props", "set", "--filter", "n >=", "z=1") == 1
    assert "position 4" in capsys.readouterr().err
    assert oracle.db_state(engine)[0] == before


def test_a_poison_target_in_a_batch_holds_back_none_of_the_others(
    settings: Settings, engine: Engine, staging: Staging
) -> None:
    """The task's batches apply as the batch task does: the version whose apply fails alone
    (a line staged before the edit poisons it) is quarantined with both its entries kept, and
    every other version gets the edit; `sidecar retry` applies the line, then the edit."""
    settings = settings.with_(apply_retries=0)
    _versions(engine, staging, 4)
    poisoned = Target("version", "press", "v2")
    _stage(staging, "late.metadata.jsonl", [_doc("v2", {"poison": "yes"})])
    ident = bulk.create(engine, bulk.checked("version", {"filter": "exists n", "set": {"z": 1}}), limit=100)
    _poison(engine)
    try:
        assert run_bulk(make_app(settings), settings, engine, staging, ident)["state"] == "done"
        props, _ = oracle.db_state(engine)
        assert [props[f"dataset://press/v{i}"].get("z") for i in range(4)] == [1, 1, None, 1]
        assert set(staging.quarantined()) == {poisoned.key}
    finally:
        _cure(engine)

    def apply(key: str) -> None:
        apply_targets(engine, staging, [Target.parse(key)])

    retry_targets(engine, staging, apply, [poisoned.key])
    props, _ = oracle.db_state(engine)
    assert props[poisoned.key] == {"k0": "a", "n": 2, "poison": "yes", "z": 1}
