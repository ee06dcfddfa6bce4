"""Version membership (`from`, `exclude`, `start_fresh`) and version aliases, applied on both databases."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.oracle import assert_files_match_db, db_files, expected_files
from worker.api import create_app
from worker.applying import apply_target
from worker.cli import main
from worker.errors import InvalidEntry
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.records import LineOutcome, Source, line_digest, parse_line
from worker.settings import Settings
from worker.staging import Staging
from worker.status import _print, collect
from worker.store import aliases
from worker.store.models import AliasChange, DatasetVersion, Datum, VersionAlias, VersionFile
from worker.store.queries import find_by_uri
from worker.uris import Target

pytestmark = pytest.mark.redis


def datum(path: str, *items: Any, **props: Any) -> bytes:
    return orjson.dumps({"file": path, "metadata": {**props, "valohai.dataset-versions": list(items)}})


def stage(staging: Staging, execution: str, *lines: bytes) -> None:
    """Stage an execution's lines, as the watcher does (a line may carry entries and a reject)."""
    outcomes = []
    for number, raw in enumerate(lines, 1):
        out = LineOutcome(number, line_digest(raw))
        problems: list[str] = []
        source = Source("sidecar", execution, f"{execution}/valohai.metadata.jsonl", number, 0)
        out.entries = parse_line(raw, source, problems)
        assert not problems, problems
        outcomes.append(out)
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, f"s{len(lines)}")


def complete(engine: Engine, staging: Staging, *executions: str) -> None:
    """`execution_completed` for each execution, then every due version applied."""
    for execution in executions:
        staging.complete_execution(execution)
    apply_due(engine, staging)


def apply_due(engine: Engine, staging: Staging) -> None:
    for key in staging.due_targets(older_than=-1):
        target = Target.parse(key)
        if target.kind == "version":
            apply_target(engine, staging, target)


def files(engine: Engine, uri: str) -> dict[str, str]:
    """File name -> the execution that wrote it, for a version's files."""
    with Session(engine) as session:
        _, version_id = find_by_uri(session, uri)
        rows = session.execute(
            select(Datum.path, Datum.execution)
            .join(VersionFile, VersionFile.datum_id == Datum.id)
            .where(VersionFile.version_id == version_id)
        ).all()
    names = [path for path, _ in rows]
    assert len(names) == len(set(names)), f"two files of one name in {uri}: {sorted(names)}"
    return dict(rows)


def version(engine: Engine, uri: str) -> DatasetVersion:
    with Session(engine) as session:
        _, version_id = find_by_uri(session, uri)
        row = session.get(DatasetVersion, version_id)
        assert row is not None
        session.expunge(row)
        return row


def reasons(staging: Staging) -> list[str]:
    return [r.reason for r in staging.rejects()]


def build_v1(engine: Engine, staging: Staging) -> None:
    """dataset://ds/v1 = a.csv, b.csv, c.csv from exec-1."""
    stage(staging, "exec-1", *(datum(f"{n}.csv", "dataset://ds/v1") for n in "abc"))
    complete(engine, staging, "exec-1")


def test_first_version_holds_the_files_that_name_it(engine: Engine, staging: Staging) -> None:
    stage(
        staging,
        "exec-1",
        datum("a.csv", {"uri": "dataset://ds/v1", "from": None}),
        datum("sub/b.csv", "dataset://ds/v1"),
        datum("other.csv", "dataset://other/v1"),
        datum("a.csv", "dataset://ds/v1", rows=3),  # the same file again: still one file
    )
    complete(engine, staging, "exec-1")
    assert files(engine, "dataset://ds/v1") == {"a.csv": "exec-1", "sub/b.csv": "exec-1"}
    row = version(engine, "dataset://ds/v1")
    assert row.status == "completed" and row.previous_version_id is None and row.spec_problem is None
    assert row.spec["builders"] == ["exec-1"] and row.spec["from"] is None
    assert staging.rejects() == []


def test_incremental_version_carries_over_and_excludes(engine: Engine, staging: Staging) -> None:
    build_v1(engine, staging)
    item = {"uri": "dataset://ds/v2", "from": "dataset://ds/v1", "exclude": ["b.csv", "never-there.csv"]}
    stage(staging, "exec-2", datum("d.csv", item), datum("a.csv", item))  # a.csv replaced, b.csv dropped
    complete(engine, staging, "exec-2")
    assert files(engine, "dataset://ds/v2") == {"a.csv": "exec-2", "c.csv": "exec-1", "d.csv": "exec-2"}
    v1, v2 = version(engine, "dataset://ds/v1"), version(engine, "dataset://ds/v2")
    assert v2.previous_version_id == v1.id and v2.spec_problem is None
    assert (
        v2.spec["exclude"] == ["b.csv", "never-there.csv"] and v2.spec["resolved_from"] == "dataset://ds/v1"
    )
    # The base is immutable: v1 still holds its own three files.
    assert files(engine, "dataset://ds/v1") == {"a.csv": "exec-1", "b.csv": "exec-1", "c.csv": "exec-1"}


def test_start_fresh_takes_no_base_file(engine: Engine, staging: Staging) -> None:
    build_v1(engine, staging)
    item = {"uri": "dataset://ds/v2", "from": "dataset://ds/v1", "start_fresh": True}
    stage(staging, "exec-2", datum("z.csv", item))
    complete(engine, staging, "exec-2")
    assert files(engine, "dataset://ds/v2") == {"z.csv": "exec-2"}


def test_a_run_that_only_uploads_a_marker_is_base_plus_marker(engine: Engine, staging: Staging) -> None:
    build_v1(engine, staging)
    item = {"uri": "dataset://ds/v2", "from": "dataset://ds/latest", "exclude": []}
    stage(staging, "exec-2", datum("_marker", item))
    complete(engine, staging, "exec-2")
    assert files(engine, "dataset://ds/v2") == {
        "a.csv": "exec-1",
        "b.csv": "exec-1",
        "c.csv": "exec-1",
        "_marker": "exec-2",
    }
    # `latest` resolved when v2 completed: v1, the newest completed then (not v2 itself).
    assert version(engine, "dataset://ds/v2").previous_version_id == version(engine, "dataset://ds/v1").id
    assert version(engine, "dataset://ds/latest").name == "v2"


def test_from_naming_nothing_completes_with_own_files_and_says_why(
    engine: Engine, staging: Staging, capsys: Any
) -> None:
    build_v1(engine, staging)
    stage(
        staging,
        "exec-2",
        datum("x.csv", {"uri": "dataset://ds/v2", "from": "dataset://ds/v0"}),
        datum("y.csv", {"uri": "dataset://ds/v3", "from": "dataset://nope/latest"}),
    )
    complete(engine, staging, "exec-2")
    assert files(engine, "dataset://ds/v2") == {"x.csv": "exec-2"}
    assert files(engine, "dataset://ds/v3") == {"y.csv": "exec-2"}
    v2 = version(engine, "dataset://ds/v2")
    assert v2.status == "completed" and v2.previous_version_id is None
    assert v2.spec_problem and "'dataset://ds/v0' names no version that exists" in v2.spec_problem
    rejects = {r.line: r for r in staging.rejects()}
    assert rejects[1].file == "exec-2/valohai.metadata.jsonl" and rejects[1].execution == "exec-2"
    assert "dataset://ds/v0" in rejects[1].reason and "dataset://nope/latest" in rejects[2].reason
    # `sidecar status` shows the versions, and the rejects as any others.
    report = collect(staging, stuck_after=300, engine=engine)
    assert [v["uri"] for v in report["version_problems"]] == ["dataset://ds/v3", "dataset://ds/v2"]
    assert report["rejects_last_hour"] == 2
    _print(report)
    out = capsys.readouterr().out
    assert "dataset://ds/v2" in out and "names no version that exists" in out


def test_from_naming_a_version_still_building_is_a_problem(engine: Engine, staging: Staging) -> None:
    stage(staging, "exec-1", datum("a.csv", "dataset://ds/v1"))
    apply_target(engine, staging, Target("version", "ds", "v1"))  # registered, building
    stage(staging, "exec-2", datum("b.csv", {"uri": "dataset://ds/v2", "from": "dataset://ds/v1"}))
    complete(engine, staging, "exec-2")
    v2 = version(engine, "dataset://ds/v2")
    assert files(engine, "dataset://ds/v2") == {"b.csv": "exec-2"}
    assert v2.spec_problem and "not completed" in v2.spec_problem


def test_two_executions_name_one_new_version(engine: Engine, staging: Staging) -> None:
    build_v1(engine, staging)
    stage(staging, "exec-2", datum("x.csv", {"uri": "dataset://ds/v2", "from": "dataset://ds/v1"}))
    stage(
        staging,
        "exec-3",
        datum("y.csv", {"uri": "dataset://ds/v2", "from": "dataset://ds/v1", "exclude": ["a.csv"]}),
        datum("x.csv", {"uri": "dataset://ds/v2", "from": "dataset://other/v9"}),  # conflicting from
    )
    complete(engine, staging, "exec-2", "exec-3")
    # First `from` wins; exclusions of the agreeing items add up; of two own x.csv the later wins.
    assert files(engine, "dataset://ds/v2") == {
        "b.csv": "exec-1",
        "c.csv": "exec-1",
        "x.csv": "exec-3",
        "y.csv": "exec-3",
    }
    (reject,) = staging.rejects()
    assert (
        reject.line == 2
        and reject.execution == "exec-3"
        and "conflicts with 'dataset://ds/v1'" in reject.reason
    )
    assert version(engine, "dataset://ds/v2").spec["builders"] == ["exec-2", "exec-3"]


def test_a_late_member_from_a_builder_joins_and_from_anyone_else_is_refused(
    engine: Engine, staging: Staging
) -> None:
    build_v1(engine, staging)
    item = {"uri": "dataset://ds/v2", "from": "dataset://ds/v1"}
    stage(staging, "exec-2", datum("x.csv", item))
    staging.complete_version(Target("version", "ds", "v2"))
    apply_due(engine, staging)
    before = files(engine, "dataset://ds/v2")
    # exec-3 had no file in v2 when it completed: refused, nothing changes.
    stage(staging, "exec-3", datum("late.csv", item), datum("a.csv", item))
    apply_due(engine, staging)
    assert files(engine, "dataset://ds/v2") == before
    refused = staging.rejects()
    assert len(refused) == 2 and all("is completed and its files cannot change" in r.reason for r in refused)
    assert {r.execution for r in refused} == {"exec-3"}
    # exec-2 (a builder) is still being read: its late files join, replacing a base file by name.
    staging.redis.delete(staging.keys.lines("exec-2/valohai.metadata.jsonl"))
    stage(staging, "exec-2", datum("x.csv", item), datum("y.csv", item), datum("a.csv", item))
    apply_due(engine, staging)
    assert files(engine, "dataset://ds/v2") == {**before, "y.csv": "exec-2", "a.csv": "exec-2"}
    assert len(staging.rejects()) == 2


def test_a_late_line_after_execution_completed_completes_with_it(engine: Engine, staging: Staging) -> None:
    """The watcher lags: execution_completed arrives before the line naming the version."""
    build_v1(engine, staging)
    stage(staging, "exec-2", datum("x.csv", {"uri": "dataset://ds/v2", "from": "dataset://ds/v1"}))
    staging.complete_execution("exec-2")  # v2 completes with x.csv (exec-2 becomes a builder)
    stage(
        staging,
        "exec-3",
        b'{"file": "first.csv", "metadata": {}}',
    )
    staging.complete_execution("exec-3")
    # exec-3's line naming v3 arrives after its completion: the staging script completes v3 with it.
    staging.redis.delete(staging.keys.lines("exec-3/valohai.metadata.jsonl"))
    stage(
        staging,
        "exec-3",
        b'{"file": "first.csv", "metadata": {}}',
        datum("late.csv", {"uri": "dataset://ds/v3", "from": "dataset://ds/v2"}),
    )
    apply_due(engine, staging)
    assert files(engine, "dataset://ds/v3") == {
        "a.csv": "exec-1",
        "b.csv": "exec-1",
        "c.csv": "exec-1",
        "x.csv": "exec-2",
        "late.csv": "exec-3",
    }
    assert staging.rejects() == []


def test_files_written_as_real_scripts_write_them(engine: Engine, staging: Staging, tmp_path: Any) -> None:
    """Per-output `<file>.metadata.json` next to each output, rewritten whole as the run goes."""
    root = tmp_path / "root"
    build_v1(engine, staging)
    out = root / "exec-2"
    (out / "imgs").mkdir(parents=True)
    item = {"uri": "dataset://ds/v2", "from": "dataset://ds/v1", "exclude": ["a.csv"]}
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    for name in ("imgs/1.png", "imgs/2.png"):
        sidecar = out / f"{name}.metadata.json"
        sidecar.write_bytes(orjson.dumps({"label": "draft", "valohai.dataset-versions": [item]}))
        ingestor.ingest(sidecar)
        sidecar.write_bytes(
            orjson.dumps({"label": "cat", "valohai.dataset-versions": [item]}, option=orjson.OPT_INDENT_2)
        )
        ingestor.ingest(sidecar)
    complete(engine, staging, "exec-2")
    assert files(engine, "dataset://ds/v2") == {
        "b.csv": "exec-1",
        "c.csv": "exec-1",
        "imgs/1.png": "exec-2",
        "imgs/2.png": "exec-2",
    }
    assert staging.rejects() == []


def test_a_bad_item_is_rejected_and_the_rest_of_the_line_applies(
    engine: Engine, staging: Staging, tmp_path: Any
) -> None:
    root = tmp_path / "root"
    (root / "exec-1").mkdir(parents=True)
    items = ["dataset://ds/v1", {"uri": "dataset://ds/v2", "exclude": "a.csv"}, {"uri": 3}, 7]
    lines = [
        orjson.dumps({"file": "a.csv", "metadata": {"k": 1, "valohai.dataset-versions": items}}),
        orjson.dumps({"file": "b.csv", "metadata": {"valohai.dataset-versions": "dataset://ds/v1"}}),
        orjson.dumps(
            {
                "file": "c.csv",
                "metadata": {
                    "valohai.dataset-versions": [
                        {"uri": "dataset://ds/v1", "targeting_aliases": ["no way"]},
                        "dataset://ds/v1",
                    ]
                },
            }
        ),
    ]
    (root / "exec-1" / "valohai.metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    Ingestor(root, staging, line_limit=1 << 20).ingest(root / "exec-1" / "valohai.metadata.jsonl")
    complete(engine, staging, "exec-1")
    apply_target(engine, staging, Target.for_execution("exec-1"))
    # c.csv's bad item is dropped; its plain item naming v1 still counts.
    assert files(engine, "dataset://ds/v1") == {"a.csv": "exec-1", "c.csv": "exec-1"}
    with Session(engine) as session:
        props = {d.path: d.properties for d in session.scalars(select(Datum))}
    assert props["a.csv"]["k"] == 1 and set(props) == {"a.csv", "b.csv", "c.csv"}
    rejects = sorted(staging.rejects(), key=lambda r: r.line)
    assert [r.line for r in rejects] == [1, 2, 3]
    assert (
        "[1].exclude" in rejects[0].reason and "[2].uri" in rejects[0].reason and "[3]" in rejects[0].reason
    )
    assert "expected a list" in rejects[1].reason
    assert "[0].targeting_aliases: alias 'no way'" in rejects[2].reason


# -- aliases ---------------------------------------------------------------------------------------


def test_targeting_aliases_move_on_completion_with_history(engine: Engine, staging: Staging) -> None:
    stage(staging, "exec-1", datum("a.csv", {"uri": "dataset://ds/v1", "targeting_aliases": ["production"]}))
    complete(engine, staging, "exec-1")
    v1 = version(engine, "dataset://ds/v1")
    assert version(engine, "dataset://ds/production").id == v1.id
    item = {
        "uri": "dataset://ds/v2",
        "from": "dataset://ds/production",
        "targeting_aliases": ["production", "x"],
    }
    stage(staging, "exec-2", datum("b.csv", item))
    complete(engine, staging, "exec-2")
    v2 = version(engine, "dataset://ds/v2")
    assert files(engine, "dataset://ds/v2") == {"a.csv": "exec-1", "b.csv": "exec-2"}
    assert v2.previous_version_id == v1.id
    assert version(engine, "dataset://ds/production").id == v2.id
    with Session(engine) as session:
        assert aliases.version_aliases(session, [v1.id, v2.id, 999]) == {v2.id: ["production", "x"]}
        alias = session.scalar(select(VersionAlias).where(VersionAlias.name == "production"))
        assert alias is not None
        history = session.scalars(
            select(AliasChange).where(AliasChange.alias_id == alias.id).order_by(AliasChange.id)
        ).all()
    assert [(h.alias_kind, h.old_id, h.new_id) for h in history] == [
        ("version", None, v1.id),
        ("version", v1.id, v2.id),
    ]
    assert history[1].source == {
        "origin": "sidecar",
        "execution": "exec-2",
        "file": "exec-2/valohai.metadata.jsonl",
        "line": 1,
        "offset": 0,
    }


def test_an_alias_may_not_take_a_version_name_and_a_version_name_wins(
    engine: Engine, staging: Staging
) -> None:
    build_v1(engine, staging)
    stage(
        staging, "exec-2", datum("b.csv", {"uri": "dataset://ds/v2", "targeting_aliases": ["v1", "v2", "ok"]})
    )
    complete(engine, staging, "exec-2")
    got = reasons(staging)
    assert len(got) == 2 and all("is the name of a version" in r for r in got)
    with Session(engine) as session:
        assert [a.name for a in session.scalars(select(VersionAlias))] == ["ok"]
    # A version created later under an alias's name wins when the URI is resolved.
    stage(staging, "exec-3", datum("c.csv", "dataset://ds/ok"))
    complete(engine, staging, "exec-3")
    assert version(engine, "dataset://ds/ok").name == "ok"


def test_an_alias_uri_works_wherever_a_version_uri_does(
    engine: Engine, staging: Staging, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`/resolve/`, inputs named in events (`valohai.last-used`), `sidecar props get|set`, `from`."""
    item = {"uri": "dataset://ds/v1", "targeting_aliases": ["production"]}
    stage(staging, "exec-1", datum("a.csv", item))
    complete(engine, staging, "exec-1")
    with TestClient(create_app(engine, staging, lambda key: None)) as client:
        answer = client.get("/api/v0/dataset-versions/resolve/", params={"uri": "dataset://ds/production"})
        assert answer.status_code == 200 and answer.json()["name"] == "v1"
        assert "valohai.last-used" in answer.json()["properties"]
        missing = client.get("/api/v0/dataset-versions/resolve/", params={"uri": "dataset://ds/staging"})
        assert missing.status_code == 404
        stage(staging, "exec-2", datum("b.csv", {"uri": "dataset://ds/v2", "targeting_aliases": ["staging"]}))
        complete(engine, staging, "exec-2")
        event = {"type": "execution_started", "data": {"inputs": {"train": ["dataset://ds/staging"]}}}
        assert client.post("/webhooks/events", json=event).status_code == 202
    assert "valohai.last-used" in version(engine, "dataset://ds/v2").shown_properties
    monkeypatch.setenv("SIDECAR_REDIS_PREFIX", settings.redis_prefix)
    flags = ["--database-url", settings.effective_database_url, "--redis-url", settings.effective_redis_url()]
    assert main(["props", "set", *flags, "dataset://ds/production", "checked=true"]) == 0
    capsys.readouterr()
    assert version(engine, "dataset://ds/v1").properties["checked"] is True
    assert main(["props", "get", *flags, "dataset://ds/production"]) == 0
    assert json.loads(capsys.readouterr().out)["checked"] is True


# -- the oracle ------------------------------------------------------------------------------------

NAMES = ["a.csv", "b.csv", "c.csv", "sub/d.csv", "e.csv"]


def random_item(rng: random.Random, dataset: str, i: int) -> Any:
    """A `valohai.dataset-versions` item for version v<i>, sometimes a bad one."""
    uri = f"dataset://{dataset}/v{i}"
    if rng.random() < 0.15:
        return uri
    if rng.random() < 0.05:
        return rng.choice([7, {"uri": uri, "exclude": "a.csv"}, {"uri": uri, "targeting_aliases": ["a b"]}])
    item: dict[str, Any] = {"uri": uri}
    item["from"] = rng.choice(
        [None, f"dataset://{dataset}/latest", f"dataset://{dataset}/prod", f"dataset://{dataset}/v99"]
        + [f"dataset://{dataset}/v{j}" for j in range(i)]
    )
    if rng.random() < 0.6:
        item["exclude"] = rng.sample(NAMES, rng.randint(0, 2))
    if rng.random() < 0.1:
        item["start_fresh"] = True
    if rng.random() < 0.4:
        item["targeting_aliases"] = ["prod"]
    return item


@pytest.mark.parametrize("seed", range(6))
def test_version_files_equal_the_oracle(engine: Engine, staging: Staging, tmp_path: Any, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "root"
    ingestor = Ingestor(root, staging, line_limit=1 << 20)
    paths, order = [], []
    for i in range(8):
        uri = f"dataset://r/v{i}"
        builders = [f"exec-{i}-{k}" for k in range(rng.choice([1, 1, 2]))]
        for execution in builders:
            path = root / execution / "valohai.metadata.jsonl"
            path.parent.mkdir(parents=True)
            lines = []
            for name in rng.sample(NAMES, rng.randint(1, 3)):
                items = [random_item(rng, "r", i)]
                if rng.random() < 0.3:
                    items.append(f"dataset://other/v{i}")
                lines.append(
                    orjson.dumps({"file": name, "metadata": {"n": i, "valohai.dataset-versions": items}})
                )
            path.write_bytes(b"\n".join(lines) + b"\n")
            ingestor.ingest(path)
            paths.append(path)
        complete(engine, staging, *builders)
        order += [uri, f"dataset://other/v{i}"]
    expected = expected_files(paths, root=root, order=order)
    assert_files_match_db(engine, {k: v for k, v in expected.items() if v})


def test_completions_racing_for_the_same_aliases(engine: Engine, staging: Staging) -> None:
    """Versions completing at once, each moving the same aliases (named in different orders): no
    deadlock, no lost history; each alias ends at one of them, and its history chains."""
    names = [["prod", "x", "y"], ["y", "x", "prod"], ["x", "prod", "y"], ["prod", "y", "x"]]
    for i, aliases_named in enumerate(names):
        stage(
            staging,
            f"exec-{i}",
            datum("a.csv", {"uri": f"dataset://ds/v{i}", "targeting_aliases": aliases_named}),
        )
        staging.complete_version(Target("version", "ds", f"v{i}"))
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(names))

    def complete_one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            apply_target(engine, staging, Target("version", "ds", f"v{i}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=complete_one, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    with Session(engine) as session:
        for alias in session.scalars(select(VersionAlias)):
            history = session.scalars(
                select(AliasChange).where(AliasChange.alias_id == alias.id).order_by(AliasChange.id)
            ).all()
            assert len(history) == len(names) and history[0].old_id is None
            assert all(h.old_id == prev.new_id for prev, h in zip(history, history[1:], strict=False))
            assert history[-1].new_id == alias.version_id


_uris = st.sampled_from(
    ["dataset://f/v1", "dataset://f/v2", "dataset://f/latest", "dataset://f/p", "dataset://g/v1"]
)
_anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
_items = st.one_of(
    _uris,
    _anything,
    st.fixed_dictionaries(
        {"uri": _uris | _anything},
        optional={
            "from": _uris | _anything,
            "exclude": st.lists(st.sampled_from(["a", "b", "c"]) | _anything, max_size=3) | _anything,
            "start_fresh": st.booleans() | _anything,
            "targeting_aliases": st.lists(st.sampled_from(["p", "v1", "x y", "latest", "q"]), max_size=3)
            | _anything,
            "packaging": _anything,
        },
    ),
)
_fuzz_round = itertools.count()


@hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(_items, max_size=3)), max_size=6))
def test_any_version_items_never_fail_an_apply(
    engine: Engine, redis_client: Any, prefix: str, lines: list[tuple[str, list[Any]]]
) -> None:
    """Whatever the items hold, staging and applying them raises nothing, on both databases, and no
    version ends with two files of one name."""
    staging = Staging(redis_client, Keys(f"{prefix}-{next(_fuzz_round)}"))
    execution = f"exec-fuzz-{next(_fuzz_round)}"
    outcomes = []
    for number, (path, items) in enumerate(lines, 1):
        raw = orjson.dumps({"file": path, "metadata": {"valohai.dataset-versions": items}})
        out = LineOutcome(number, line_digest(raw))
        with contextlib.suppress(InvalidEntry):  # refused whole (a NUL): nothing of it is staged
            out.entries = parse_line(raw, Source("sidecar", execution, f"{execution}/f", number, 0), [])
        outcomes.append(out)
    staging.stage_lines(f"{execution}/f", execution, outcomes, "s")
    staging.complete_execution(execution)
    apply_due(engine, staging)
    apply_due(engine, staging)  # a second round changes nothing and raises nothing
    db_files(engine)  # asserts one file per name in every version
