"""A batch of applies equals the same applies one by one; one bad target among 1,000 due ones
holds back none of the others. Real Redis, SQLite and PostgreSQL.

The equivalence is checked on the whole database: every row of every table an apply writes,
surrogate ids replaced by natural keys, clock readings and stream ids left out (a batch reads
the clock once per target, as separate applies do, only not at the same instants; the two runs
stage into two prefixes, whose stream ids differ).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import Engine, Table, delete, select

from tests.test_quarantine import _cure, _poison
from worker import applying
from worker.applying import apply_target, apply_targets
from worker.keys import Keys
from worker.records import LineOutcome, Source, line_digest, parse_line
from worker.settings import Settings
from worker.staging import Staging
from worker.store import quarantine
from worker.store.db import make_engine
from worker.store.models import Base
from worker.tasks import make_app, retry_targets, run_batch
from worker.uris import Target

pytestmark = pytest.mark.redis

JSONL = "valohai.metadata.jsonl"
DS = "dataset://many"


# -- two environments: two databases, two staging prefixes on the same Redis ---------------------


class Env:
    def __init__(self, engine: Engine, staging: Staging) -> None:
        self.engine, self.staging = engine, staging

    def stage(self, execution: str, lines: list[dict[str, Any]], first: int) -> None:
        """Stage lines as the watcher does (numbered from `first`); a bad item costs only itself."""
        outcomes = []
        for number, line in enumerate(lines, first):
            raw = orjson.dumps(line)
            out = LineOutcome(number, line_digest(raw))
            source = Source("sidecar", execution, f"{execution}/{JSONL}", number, 0)
            out.entries = parse_line(raw, source, [])
            outcomes.append(out)
        self.staging.stage_lines(f"{execution}/{JSONL}", execution, outcomes, f"s{first + len(lines)}")

    def reset(self) -> None:
        with self.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(delete(table))
        keys = list(self.staging.redis.scan_iter(match=self.staging.keys.tag + "*", count=1000))
        if keys:
            self.staging.redis.delete(*keys)


@pytest.fixture
def pair(database_url: str, tmp_path: Path, redis_client: Any, prefix: str) -> Iterator[tuple[Env, Env]]:
    """Two empty databases of the test's kind (a second SQLite file, or a second schema)."""
    urls = [database_url]
    cleanup: list[Any] = []
    if database_url.startswith("sqlite"):
        urls.append(f"sqlite:///{tmp_path / 'second.db'}")
    else:
        base, _, _ = database_url.partition("?")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = make_engine(base)
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        urls.append(f"{base}?options=-csearch_path%3D{schema}")

        def drop() -> None:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            admin.dispose()

        cleanup.append(drop)
    envs = []
    for i, url in enumerate(urls):
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        envs.append(Env(engine, Staging(redis_client, Keys(f"{prefix}-{i}"))))
    yield envs[0], envs[1]
    for env in envs:
        env.reset()
        env.engine.dispose()
    for fn in cleanup:
        fn()


def state(engine: Engine) -> dict[str, list[Any]]:
    """Every row an apply writes, by table, ids mapped to natural keys and clocks left out."""
    tables = {t.name: t for t in Base.metadata.sorted_tables}
    with engine.connect() as conn:

        def rows(name: str) -> list[dict[str, Any]]:
            table: Table = tables[name]
            order = [table.c.id] if "id" in table.c else list(table.primary_key.columns)
            return [dict(r._mapping) for r in conn.execute(select(table).order_by(*order))]

        datasets = {r["id"]: r["name"] for r in rows("datasets")}
        versions = {r["id"]: f"{datasets[r['dataset_id']]}/{r['name']}" for r in rows("dataset_versions")}
        datums = {r["id"]: f"{r['execution']}:{r['path']}" for r in rows("datums")}
        owners = {"dataset": datasets, "version": versions, "datum": datums}
        version_aliases = {
            r["id"]: f"{datasets[r['dataset_id']]}@{r['name']}" for r in rows("version_aliases")
        }
        datum_aliases = {r["id"]: r["name"] for r in rows("datum_aliases")}
        refs = {
            "dataset_id": datasets,
            "version_id": versions,
            "previous_version_id": versions,
            "datum_id": datums,
        }
        out: dict[str, list[Any]] = {}
        for name in tables:
            if name in (
                "quarantined_targets",
                "finished_files",
                "finished_executions",
                "saved_searches",
                "definition_recheck",
            ):
                continue
            got = []
            for row in rows(name):
                item: dict[str, Any] = {}
                for column, value in row.items():
                    if column in ("id", "uid") or column.endswith("_at"):
                        continue
                    if column == "stream_id":
                        value = value is not None
                    elif column in refs and value is not None:
                        value = refs[column][value]
                    elif column == "owner_id":
                        value = owners[row["owner_kind"]][value]
                    elif column in ("alias_id", "old_id", "new_id") and value is not None:
                        version_kind = row["alias_kind"] == "version"
                        if column == "alias_id":
                            value = (version_aliases if version_kind else datum_aliases)[value]
                        else:
                            value = (versions if version_kind else datums)[value]
                    item[column] = value
                got.append(item)
            # Ids order history and alias moves. Rows are sets: a batch creates its rows of
            # one table together, so their ids come in another order than one by one.
            unordered = name not in ("property_changes", "alias_changes")
            out[name] = sorted(got, key=repr) if unordered else got
    return out


# -- the workload --------------------------------------------------------------------------------

DATASETS = ["ds0", "ds1"]
VALUES = st.one_of(st.none(), st.integers(-2, 2), st.sampled_from(["a", "b"]), st.booleans())
PROPS = st.dictionaries(st.sampled_from(["k0", "k1", "k2"]), VALUES, min_size=1, max_size=2)
URIS = st.builds(
    lambda d, v: f"dataset://{d}/{v}", st.sampled_from(DATASETS), st.sampled_from(["v0", "v1", "v2", "v3"])
)
BASES = st.one_of(
    URIS, st.sampled_from(["dataset://ds0/latest", "dataset://ds1/latest", "dataset://ds0/best"])
)
ITEMS = st.one_of(
    URIS,
    st.builds(lambda uri, base: {"uri": uri, "from": base}, URIS, BASES),
    st.builds(lambda uri, base: {"uri": uri, "from": base, "exclude": ["a.csv"]}, URIS, BASES),
    st.builds(lambda uri: {"uri": uri, "targeting_aliases": ["best"]}, URIS),
)


def _datum(path: str, items: list[Any], props: dict[str, Any], alias: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {**props, "valohai.dataset-versions": items}
    if alias is not None:
        meta["valohai.alias"] = alias
    return {"file": path, "metadata": meta}


LINES = st.lists(
    st.one_of(
        st.builds(lambda uri, p: {"dataset-version": uri, "metadata": p}, URIS, PROPS),
        st.builds(
            lambda d, p: {"dataset": f"dataset://{d}", "metadata": p}, st.sampled_from(DATASETS), PROPS
        ),
        st.builds(
            _datum,
            st.sampled_from(["a.csv", "b.csv", "c.csv"]),
            st.lists(ITEMS, max_size=2),
            PROPS,
            st.one_of(st.none(), st.just("picked")),
        ),
    ),
    min_size=1,
    max_size=10,
)
# A phase: one execution's lines, the versions completed by `dataset_version_created` ahead of
# the execution's end, and whether the execution completes (else only those versions do).
PHASES = st.lists(
    st.tuples(LINES, st.lists(URIS, max_size=2, unique=True), st.booleans()), min_size=1, max_size=3
)


def run(env: Env, phases: list[tuple[list[dict[str, Any]], list[str], bool]], batched: bool) -> None:
    for number, (lines, early, ends) in enumerate(phases):
        execution = f"exec-{number}"
        env.stage(execution, lines, 1)
        for uri in early:
            env.staging.complete_version(Target.parse(uri))
        if ends:
            env.staging.complete_execution(execution)
        due = sorted(env.staging.due_targets(older_than=-1))
        if batched:
            apply_targets(env.engine, env.staging, [Target.parse(k) for k in due])
        else:
            for key in due:
                apply_target(env.engine, env.staging, Target.parse(key))


@hsettings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phases=PHASES)
def test_a_batch_equals_the_same_applies_one_by_one(
    pair: tuple[Env, Env], phases: list[tuple[list[dict[str, Any]], list[str], bool]]
) -> None:
    one, batch = pair
    for env in pair:
        env.reset()
    run(one, phases, batched=False)
    run(batch, phases, batched=True)
    expected, got = state(one.engine), state(batch.engine)
    for table in expected:
        assert got[table] == expected[table], table
    assert one.staging.due_targets(-1) == [] and batch.staging.due_targets(-1) == []
    assert [r.reason for r in one.staging.rejects()] == [r.reason for r in batch.staging.rejects()]


def test_a_batch_is_one_transaction_with_its_watermarks(pair: tuple[Env, Env]) -> None:
    """Nothing of a failed batch is committed, watermarks included: it is applied again whole."""
    env = pair[0]
    lines = [{"dataset-version": f"dataset://ds0/v{i}", "metadata": {"k": i}} for i in range(5)]
    lines.append({"dataset-version": "dataset://ds0/v4", "metadata": {"poison": 1}})
    env.stage("exec-0", lines, 1)
    targets = [Target("version", "ds0", f"v{i}") for i in range(5)]
    for target in targets:
        env.staging.complete_version(target)
    _poison(env.engine)
    with pytest.raises(Exception, match="poisoned by the test"):
        apply_targets(env.engine, env.staging, targets)
    assert {table: rows for table, rows in state(env.engine).items() if rows} == {}
    _cure(env.engine)
    results = apply_targets(env.engine, env.staging, targets)
    assert [r.applied for r in results] == [1, 1, 1, 1, 2]
    assert len(state(env.engine)["watermarks"]) == 5


# -- one poison target among 1,000 ---------------------------------------------------------------


def test_one_poison_target_among_a_thousand_holds_back_none_of_the_others(
    settings: Settings, engine: Engine, staging: Staging
) -> None:
    """The batch task's work (run here in-process) halves the failing batch down
    to the target that fails alone; the 999 others are applied, the poison is quarantined (no
    retries left) with its entry kept, and `sidecar retry` applies it once the cause is gone."""
    settings = settings.with_(apply_retries=0)
    env = Env(engine, staging)
    metas: list[dict[str, Any]] = [{"n": i} for i in range(1000)]
    metas[617]["poison"] = True
    lines = [{"dataset-version": f"{DS}/v{i:04d}", "metadata": meta} for i, meta in enumerate(metas)]
    env.stage("exec-0", lines, 1)
    targets = [Target("version", "many", f"v{i:04d}") for i in range(1000)]
    for target in targets:
        staging.complete_version(target)
    due = [k for k in staging.due_targets(-1) if k.startswith("dataset://many/")]
    _poison(engine)
    result = run_batch(make_app(settings), settings, engine, staging, [Target.parse(k) for k in sorted(due)])
    assert result["failed"] == 1
    got = state(engine)
    applied = {v["name"]: v for v in got["dataset_versions"]}
    bad = "v0617"
    assert bad not in applied  # its every apply rolled back
    assert len(applied) == 999
    assert all(
        v["status"] == "completed" and v["properties"] == {"n": int(name[1:])} for name, v in applied.items()
    )
    assert quarantine.listed(engine).keys() == {f"{DS}/{bad}"}
    assert set(staging.quarantined()) == {f"{DS}/{bad}"}
    assert staging.due_targets(-1) == [DS]  # the dataset target, never sent here
    _cure(engine)

    def apply_now(key: str) -> None:
        apply_target(engine, staging, Target.parse(key))  # what the worker does with the task

    retry_targets(engine, staging, apply_now, [f"{DS}/{bad}"])
    fixed = {v["name"]: v for v in state(engine)["dataset_versions"]}[bad]
    assert fixed["status"] == "completed" and fixed["properties"] == {"n": 617, "poison": True}


@hsettings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phases=PHASES)
def test_an_execution_applied_a_slice_per_transaction_ends_where_one_transaction_would(
    pair: tuple[Env, Env], phases: list[tuple[list[dict[str, Any]], list[str], bool]]
) -> None:
    """`applying.TRANSACTION_ENTRIES` at 1: every execution and dataset target is applied one
    entry per transaction (each with its watermark and finish), and the store ends as the
    applies one by one, whole, leave it. History is compared owner by owner: the slices of one
    target come in between other targets' applies, so rows of different owners interleave
    otherwise, while each owner's history keeps its order. Alias moves are compared by where
    each alias ends: an apply points an alias at its last claim, so two claims in two slices
    record the move in between as well."""
    one, sliced = pair
    for env in pair:
        env.reset()
    run(one, phases, batched=False)
    with mock.patch.object(applying, "TRANSACTION_ENTRIES", 1):
        run(sliced, phases, batched=True)
    expected, got = state(one.engine), state(sliced.engine)
    for table in expected:
        if table == "property_changes":  # a stable sort: each owner's rows stay in their order
            for rows in (expected, got):
                rows[table] = sorted(rows[table], key=lambda r: (r["owner_kind"], repr(r["owner_id"])))
        if table == "alias_changes":
            for rows in (expected, got):
                rows[table] = sorted(
                    {(r["alias_kind"], r["alias_id"]): r["new_id"] for r in rows[table]}.items()
                )
        assert got[table] == expected[table], table
    assert sliced.staging.due_targets(-1) == []
    assert [r.reason for r in one.staging.rejects()] == [r.reason for r in sliced.staging.rejects()]


def test_a_long_execution_goes_on_in_tasks_of_a_slice_each_at_the_back_of_the_bulk_queue(
    settings: Settings, engine: Engine, staging: Staging, redis_client: Any
) -> None:
    """The batch task applies one slice of a long execution target and sends the rest as a task
    of its own on the bulk queue (it neither loops on it nor holds the apply queue's worker);
    running the tasks it sends applies everything, once."""
    env = Env(engine, staging)
    lines = [{"file": f"f{i}.csv", "metadata": {"n": i}} for i in range(5)]
    env.stage("exec-long", lines, 1)
    staging.complete_execution("exec-long")
    target = Target.for_execution("exec-long")
    app = make_app(settings)
    queue = Keys(settings.redis_prefix).bulk_queue
    with mock.patch.object(applying, "TRANSACTION_ENTRIES", 2):
        assert run_batch(app, settings, engine, staging, [target])["applied"] == 2
        sent: list[str] = []
        while redis_client.llen(queue):
            message = orjson.loads(redis_client.rpop(queue))
            sent.append(message["headers"]["task"])
            if sent[-1] == "sidecar.apply_batch":
                keys = orjson.loads(base64.b64decode(message["body"]))[0][0]
                assert keys == [target.key]
                run_batch(app, settings, engine, staging, [Target.parse(k) for k in keys])
    # Slices of 2, 2, then the last 1, which sends nothing more but the execution's checksums.
    assert sent == ["sidecar.apply_batch", "sidecar.apply_batch", "sidecar.checksums"]
    got = sorted(d["properties"]["n"] for d in state(engine)["datums"])
    assert got == [0, 1, 2, 3, 4]
    assert staging.due_targets(-1) == []
