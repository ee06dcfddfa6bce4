"""`sidecar rollback`: one execution's property changes reverted, conflicts left, a rollback of a
rollback restoring; against the oracle (tests/oracle.py), real Redis and both databases."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, func, select

from tests import oracle
from tests.helpers import outcome
from tests.test_props_cli import run as run_cli
from worker.api import create_app
from worker.applying import apply_target, apply_targets, roll_back, rollback_json, write_properties
from worker.errors import NotFound
from worker.records import Entry, Source, user_write
from worker.rollback import Change, Conflict, Revert, judge
from worker.settings import Settings
from worker.staging import Staging
from worker.store.models import Base, Dataset, DatasetVersion, Datum, PropertyChange
from worker.store.rollback import plan
from worker.uris import Target

pytestmark = pytest.mark.redis

DATASET, VERSION = Target("dataset", "press"), Target("version", "press", "v1")
X = "exec-b"  # the execution rolled back


# -- the pure core -------------------------------------------------------------------------------


def _row(made_by: str | None, old: Any, new: Any) -> Change:
    return Change(made_by, old, new, {"origin": "sidecar" if made_by else "api", "execution": made_by})


def test_judge_reverts_the_makers_last_run_and_leaves_later_changes_of_others() -> None:
    assert judge("k", [_row(X, None, 1)], X, 1) == Revert("k", 1, None)
    assert judge("k", [_row(X, 0, 1), _row(X, 1, 2)], X, 2) == Revert("k", 2, 0)
    # Another source's change after the maker's: a conflict, naming it.
    found = judge("k", [_row(X, 0, 1), _row(None, 1, 5)], X, 5)
    assert isinstance(found, Conflict) and found.value == 5 and "API" in found.reason
    # Overwritten once, then the maker again: its last change goes back to the other's value.
    assert judge("k", [_row(X, 0, 1), _row("exec-c", 1, 5), _row(X, 5, 6)], X, 6) == Revert("k", 6, 5)
    # The maker's changes ended where they started: nothing to do.
    assert judge("k", [_row(X, 0, 1), _row(X, 1, 0)], X, 0) is None
    # 1 and true are different values.
    assert judge("k", [_row(X, 1, True)], X, True) == Revert("k", True, 1)


# -- round trips against the oracle --------------------------------------------------------------


def _reset(engine: Engine, staging: Staging) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(delete(table))
    keys = list(staging.redis.scan_iter(match=staging.keys.tag + "*", count=1000))
    if keys:
        staging.redis.delete(*keys)


def _apply_due(engine: Engine, staging: Staging) -> None:
    while due := staging.due_targets(older_than=-1):
        apply_targets(engine, staging, [Target.parse(k) for k in due])


KEYS = st.sampled_from(["k0", "k1", "k2"])
# A line: which target (the dataset, its version, the execution's datum), keys set (True) or
# deleted (False). Values are made unique per line, so no write repeats the value it replaces.
LINE = st.tuples(
    st.sampled_from(["dataset", "version", "datum"]), st.dictionaries(KEYS, st.booleans(), min_size=1)
)
ROUNDS = st.lists(
    st.tuples(st.sampled_from(["exec-a", X, "exec-c"]), st.lists(LINE, min_size=1, max_size=4)), max_size=6
)
API = st.lists(
    st.tuples(st.sampled_from(["dataset", "version"]), st.dictionaries(KEYS, st.just(True), min_size=1)),
    max_size=3,
)


def _doc(execution: str, tag: str, kind: str, keys: dict[str, bool]) -> dict[str, Any]:
    # Only the execution rolled back deletes. A delete by another source of a key that X had
    # deleted changes nothing, so the history has no row of it and the rollback puts the key
    # back; the oracle below (the fold without X's lines) would keep it deleted.
    meta = {k: f"{tag}-{k}" if keep or execution != X else None for k, keep in keys.items()}
    if kind == "dataset":
        return {"dataset": "dataset://press", "metadata": meta}
    if kind == "version":
        return {"dataset-version": "dataset://press/v1", "metadata": meta}
    return {"file": "a.csv", "metadata": meta}


def _oracle_key(owner: dict[str, Any]) -> str:
    if owner["kind"] == "datum":
        return oracle.datum_key(owner["target"].removeprefix("execution:"), owner["path"])
    return str(owner["target"])


def _keys(answer: dict[str, Any], part: str) -> set[tuple[str, str]]:
    return {(_oracle_key(o), item["key"]) for o in answer["owners"] for item in o[part]}


def _history_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(PropertyChange)) or 0)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=ROUNDS, api=API)
# X, another execution, X again on one key: X's last change goes back to the other's value.
@example(
    rounds=[
        (X, [("version", {"k0": True})]),
        ("exec-a", [("version", {"k0": True})]),
        (X, [("version", {"k0": False})]),
    ],
    api=[],
)
@example(
    rounds=[
        (X, [("datum", {"k0": True}), ("dataset", {"k1": True})]),
        ("exec-c", [("dataset", {"k1": True})]),
    ],
    api=[("version", {"k0": True})],
)
def test_a_rollback_equals_the_fold_without_its_lines_and_a_rollback_of_it_restores(
    engine: Engine,
    staging: Staging,
    rounds: list[tuple[str, list[Any]]],
    api: list[tuple[str, dict[str, bool]]],
) -> None:
    _reset(engine, staging)
    files: dict[str, list[bytes]] = {}
    for number, (execution, lines) in enumerate(rounds):
        # One file per round, so that one execution's rounds can come before and after another's.
        name = f"{execution}/round{number}.metadata.jsonl"
        raws = [orjson.dumps(_doc(execution, f"r{number}l{i}", *line)) for i, line in enumerate(lines, 1)]
        files[name] = raws
        staging.stage_lines(name, execution, [outcome(r, i, execution) for i, r in enumerate(raws, 1)], "s")
    staging.complete_version(VERSION)
    for execution in ("exec-a", X, "exec-c"):
        staging.complete_execution(execution)
    _apply_due(engine, staging)
    writes: list[tuple[str, dict[str, Any]]] = []
    for number, (kind, keys) in enumerate(api):
        target = DATASET if kind == "dataset" else VERSION
        ident = _owner_uid(engine, target)
        if ident is None:
            continue  # nothing of it exists: an API write needs the dataset or version
        metadata = {k: f"api{number}-{k}" for k in keys}
        write_properties(engine, staging, kind, ident, metadata)
        writes.append((target.key, metadata))
    everything = oracle.expected_state(files, api_writes=writes)
    oracle.assert_matches_db(engine, everything)

    # What the rollback must find: each key X really changed, and whether another source
    # changed it after X's last change (then it is a conflict), from the writes in apply order.
    last_maker: dict[tuple[str, str], str] = {}
    x_keys: set[tuple[str, str]] = set()  # every key X really changed
    state: dict[str, dict[str, Any]] = {}
    lines = [(name.split("/")[0], raw) for name, raws in files.items() for raw in raws]
    ordered = [(e, t, m) for e, raw in lines for t, m in oracle.classify(raw, e)]
    for maker, owner, metadata in [*ordered, *[("api", t, m) for t, m in writes]]:
        current = state.setdefault(owner, {})
        for key, value in metadata.items():
            if current.get(key) != value:  # a real change (the values are unique)
                last_maker[(owner, key)] = maker
                if maker == X:
                    x_keys.add((owner, key))
        oracle.fold_into(current, metadata)
    without_x = oracle.expected_state(
        {n: r for n, r in files.items() if not n.startswith(f"{X}/")}, api_writes=writes
    )
    conflicts = {(t, k) for t, k in x_keys if last_maker[(t, k)] != X}
    reverted = {
        (t, k) for t, k in x_keys - conflicts if everything.get(t, {}).get(k) != without_x.get(t, {}).get(k)
    }

    rows = _history_rows(engine)
    dry = rollback_json(roll_back(engine, staging, X, dry_run=True))
    oracle.assert_matches_db(engine, everything)  # a dry run changes nothing
    assert _history_rows(engine) == rows and dry["id"] is None and dry["dry_run"] is True

    answer = rollback_json(roll_back(engine, staging, X))
    assert (_keys(answer, "reverted"), _keys(answer, "conflicts")) == (reverted, conflicts)
    assert (_keys(dry, "reverted"), _keys(dry, "conflicts")) == (reverted, conflicts)
    oracle.assert_matches_db(engine, without_x)

    if answer["id"] is None:  # nothing was reverted: nothing to undo
        assert reverted == set()
        return
    undo = rollback_json(roll_back(engine, staging, answer["id"]))
    assert _keys(undo, "reverted") == reverted and _keys(undo, "conflicts") == set()
    oracle.assert_matches_db(engine, everything)
    assert staging.due_targets(older_than=-1) == []


def _owner_uid(engine: Engine, target: Target) -> str | None:
    with engine.connect() as conn:
        if target.kind == "dataset":
            return conn.scalar(select(Dataset.uid).where(Dataset.name == target.dataset))
        return conn.scalar(
            select(DatasetVersion.uid)
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
            .where(Dataset.name == target.dataset, DatasetVersion.name == target.version)
        )


# -- the API, the CLI, and the cases around ------------------------------------------------------


def _stage(staging: Staging, execution: str, *docs: dict[str, Any]) -> None:
    raws = [orjson.dumps(d) for d in docs]
    outcomes = [outcome(r, i, execution) for i, r in enumerate(raws, 1)]
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, "s")


def _version(**metadata: Any) -> dict[str, Any]:
    return {"dataset-version": "dataset://press/v1", "metadata": metadata}


def _completed(engine: Engine, staging: Staging) -> None:
    staging.complete_version(VERSION)
    for execution in ("exec-1", "exec-2"):
        staging.complete_execution(execution)
    _apply_due(engine, staging)


def test_the_api_answers_reverts_and_conflicts_and_the_history_names_the_rollback(
    engine: Engine, staging: Staging
) -> None:
    _stage(staging, "exec-1", _version(shift="day", n=1, gone="x"), {"file": "a.csv", "metadata": {"q": 1}})
    _stage(staging, "exec-2", _version(shift="night", extra=True))
    _completed(engine, staging)
    with TestClient(create_app(engine, staging, lambda _: None)) as client:
        (version,) = client.get("/api/v0/dataset-versions/").json()["results"]
        url = f"/api/v0/dataset-versions/{version['id']}/metadata/"
        assert client.post(url, json={"n": 2}).status_code == 200  # an API write: n is a conflict
        before = client.get(url).json()
        dry = client.post("/api/v0/executions/exec-1/rollback/?dry_run=true", headers=_JSON)
        assert dry.status_code == 200 and client.get(url).json() == before
        answer = client.post("/api/v0/executions/exec-1/rollback/", headers=_JSON)
        assert answer.status_code == 200
        body = answer.json()
        assert dry.json() == {**body, "id": None, "dry_run": True}
        by_kind = {o["kind"]: o for o in body["owners"]}
        assert by_kind["version"]["reverted"] == [{"key": "gone", "old": "x", "new": None}]
        # shift: exec-2 set it later; n: the API did.
        assert sorted((c["key"], c["value"]) for c in by_kind["version"]["conflicts"]) == [
            ("n", 2),
            ("shift", "night"),
        ]
        assert by_kind["version"]["conflicts"][0]["reason"].startswith("changed later by")
        assert by_kind["datum"]["reverted"] == [{"key": "q", "old": 1, "new": None}]
        assert by_kind["datum"]["path"] == "a.csv" and by_kind["datum"]["target"] == "execution:exec-1"
        assert (body["reverted"], body["conflicts"]) == (2, 2)
        assert client.get(url).json() == {"shift": "night", "n": 2, "extra": True}
        (last,) = client.get(url + "history/?limit=1&offset=6").json()["results"]
        assert last["source"] == {"origin": "rollback", "id": body["id"], "execution": "exec-1"}
        # Undo it: the key comes back.
        again = client.post(f"/api/v0/executions/{body['id']}/rollback/", headers=_JSON, json={}).json()
        assert again["reverted"] == 2 and client.get(url).json()["gone"] == "x"
        # Unknown ids and bad bodies.
        missing = client.post("/api/v0/executions/nobody/rollback/", headers=_JSON)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        bad = client.post("/api/v0/executions/exec-1/rollback/", json={"dry_run": True})
        assert bad.status_code == 400
        assert client.post("/api/v0/executions/exec-1/rollback/").status_code == 415
        schema = client.get("/openapi.json").json()
        assert "/api/v0/executions/{execution_id}/rollback/" in schema["paths"]


_JSON = {"Content-Type": "application/json"}


def test_a_change_staged_after_the_plan_wins_over_the_revert(engine: Engine, staging: Staging) -> None:
    """The race `Applier._still_expected` guards: the rollback read `n = 1`, then a write was
    staged (ahead of the revert on the stream) and applied with it: the key keeps that write."""
    _stage(staging, "exec-1", _version(n=1, m=1))
    _completed(engine, staging)
    with engine.connect() as conn:
        (owner,) = plan(conn, "exec-1")
    staging.stage_write(user_write(VERSION, {"n": 5}, Source("api")))
    reverts = {r.key: [r.old, r.new] for r in owner.reverts}
    staging.stage_write(Entry(VERSION, "revert", Source("rollback", execution="exec-1", id="r1"), reverts))
    apply_target(engine, staging, VERSION)
    oracle.assert_matches_db(engine, {"dataset://press": {}, "dataset://press/v1": {"n": 5}})


def test_lines_of_a_version_still_building_are_not_rolled_back(engine: Engine, staging: Staging) -> None:
    """Only applied changes are in the history: the staged lines of a version still building
    stay staged and are applied when it completes (README, "Rolling back an execution")."""
    _stage(staging, "exec-1", {"dataset": "dataset://press", "metadata": {"a": 1}}, _version(b=2))
    staging.complete_execution("exec-1")  # the dataset line applies; v1 is still building
    _apply_due(engine, staging)
    answer = rollback_json(roll_back(engine, staging, "exec-1"))
    assert [(o["target"], o["reverted"]) for o in answer["owners"]] == [
        ("dataset://press", [{"key": "a", "old": 1, "new": None}])
    ]
    staging.complete_version(VERSION)
    _apply_due(engine, staging)
    oracle.assert_matches_db(engine, {"dataset://press": {}, "dataset://press/v1": {"b": 2}})


def test_a_datum_of_an_execution_retention_forgot_is_reverted_without_staging(
    engine: Engine, staging: Staging
) -> None:
    """No done flag left in Redis: the revert is applied under the target's lock, and no stream
    is created again for it."""
    _stage(staging, "exec-1", {"file": "a.csv", "metadata": {"q": 1}})
    _completed(engine, staging)
    staging.redis.delete(staging.keys.done(Target("execution", execution="exec-1")))
    staging.redis.delete(staging.keys.stream(Target("execution", execution="exec-1")))
    answer = rollback_json(roll_back(engine, staging, "exec-1"))
    assert answer["reverted"] == 1
    assert not staging.redis.exists(staging.keys.stream(Target("execution", execution="exec-1")))
    with engine.connect() as conn:
        assert conn.scalar(select(Datum.properties)) == {}


def test_an_unknown_execution_is_not_found(engine: Engine, staging: Staging) -> None:
    with pytest.raises(NotFound):
        roll_back(engine, staging, "nobody", dry_run=True)
    # Known but with nothing applied (its lines are staged): an empty answer, not a 404.
    _stage(staging, "exec-9", _version(a=1))
    assert rollback_json(roll_back(engine, staging, "exec-9"))["owners"] == []


def test_cli_rollback(
    settings: Settings, engine: Engine, staging: Staging, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    _stage(staging, "exec-1", _version(n=1))
    _completed(engine, staging)
    assert run_cli(settings, "rollback", "--execution", "exec-1", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dataset://press/v1: n: 1 -> -" in out and "would revert 1 keys, 0 conflicts" in out
    assert run_cli(settings, "rollback", "--execution", "exec-1", "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["reverted"] == 1
    assert run_cli(settings, "rollback", "--execution", answer["id"]) == 0
    assert "reverted 1 keys" in capsys.readouterr().out
    oracle.assert_matches_db(engine, {"dataset://press": {}, "dataset://press/v1": {"n": 1}})
    assert run_cli(settings, "rollback", "--execution", "nobody") == 1
    assert "not found" in capsys.readouterr().err
