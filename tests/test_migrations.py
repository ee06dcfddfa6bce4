"""Migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session

from tests.test_search_sets import fill, ordered, version_names
from worker.limits import path_text
from worker.query import matches, parse
from worker.store.db import make_engine
from worker.store.migrate import alembic_config, upgrade
from worker.store.models import Base
from worker.store.queries import ListQuery, list_versions


def test_upgrade_from_nothing_to_head_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        upgrade(engine)  # a second run (another process starting) changes nothing
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            assert context.get_current_revision() is not None
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_processes_migrating_a_fresh_database_together_take_turns(database_url: str) -> None:
    """`serve --migrate` and `worker --migrate` start at the same moment (Procfile, compose).

    Each process runs the real `sidecar db upgrade`; all must succeed and leave one schema.
    """
    env = {**os.environ, "SIDECAR_DATABASE_URL": database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)  # serve --migrate, worker --migrate, sidecar up
    ]
    outputs = [proc.communicate(timeout=60)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n".join(outputs)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is not None
    finally:
        engine.dispose()


def test_upgrading_a_database_with_data_gives_every_row_a_time_ordered_id_and_loses_nothing(
    database_url: str,
) -> None:
    """0003 → 0004 on a filled database: integer ids stay (and keep working), every dataset,
    version and datum gets a public id made from its creation time, nothing else changes."""
    from datetime import UTC, datetime, timedelta

    from worker.ids import created_ms, looks_like_id
    from worker.store import queries

    engine = make_engine(database_url)
    start = datetime(2025, 12, 16, 15, 36, 52, tzinfo=UTC)
    try:
        upgrade(engine, "0003")
        with engine.begin() as conn:
            for i in range(3):
                conn.execute(
                    text(
                        "INSERT INTO datasets (id, name, properties, created_at, updated_at)"
                        " VALUES (:i, :n, :p, :t, :t)"
                    ),
                    {
                        "i": i + 1,
                        "n": f"ds{i}",
                        "p": f'{{"domain": "d{i}"}}',
                        "t": start + timedelta(hours=3 - i),
                    },
                )
            for i in range(6):
                completed = start + timedelta(days=1, minutes=i) if i % 2 == 0 else None
                conn.execute(
                    text(
                        "INSERT INTO dataset_versions (id, dataset_id, name, status, properties, created_at,"
                        " updated_at, completed_at) VALUES (:i, :d, :n, :s, :p, :t, :t, :c)"
                    ),
                    {
                        "i": i + 1,
                        "d": i % 3 + 1,
                        "n": f"v{i}",
                        "s": "completed" if completed else "building",
                        "p": f'{{"n": {i}}}',
                        "t": start + timedelta(minutes=i),
                        "c": completed,
                    },
                )
            for i in range(4):
                conn.execute(
                    text(
                        "INSERT INTO datums (id, execution, path, properties, updated_at)"
                        " VALUES (:i, 'e1', :p, '{}', :t)"
                    ),
                    {"i": i + 1, "p": f"f{i}.csv", "t": start + timedelta(seconds=i)},
                )
                conn.execute(text("INSERT INTO version_files VALUES (1, :d)"), {"d": i + 1})
            conn.execute(
                text(
                    "INSERT INTO property_changes (owner_kind, owner_id, key, old, new, source, changed_at)"
                    " VALUES ('version', 1, 'n', NULL, '0', '{\"origin\": \"api\"}', :t)"
                ),
                {"t": start},
            )
        upgrade(engine)
        with Session(engine) as session:
            for table, created in (
                ("datasets", "created_at"),
                ("dataset_versions", "created_at"),
                ("datums", "created_at"),
            ):
                rows = session.execute(
                    text(f"SELECT id, uid, {created} FROM {table} ORDER BY {created}, id")
                ).all()
                uids = [r[1] for r in rows]
                assert all(looks_like_id(u) for u in uids) and len(set(uids)) == len(uids)
                assert uids == sorted(uids), f"{table}: public ids sort as the rows were created"
            version = queries.get_version(session, 1)
            assert queries.get_version(session, version.uid).id == 1
            assert version.properties == {"n": 0} and version.status == "completed"
            assert abs(created_ms(version.uid) - int(start.timestamp() * 1000)) <= 1
            assert session.execute(text("SELECT count(*) FROM datums")).scalar() == 4
            assert session.execute(text("SELECT count(*) FROM version_files")).scalar() == 4
            assert session.execute(text("SELECT count(*) FROM property_changes")).scalar() == 1
            shown = queries.version_json(session, version)
            assert shown["files_count"] == 4 and [f["path"] for f in shown["files"]] == [
                f"f{i}.csv" for i in range(4)
            ]
            assert shown["tags"] == [] and shown["previous_version"] is None
            (dataset,) = queries.datasets_json(session, [queries.get_dataset(session, 1)])
            assert dataset["latest_version"]["name"] == "v0"  # of ds0's v0 and v3, only v0 completed
        upgrade(engine)  # again: nothing changes
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


# Strings whose order differs between code points and a linguistic collation (case, accents,
# punctuation), prefixes a `like` range must bound exactly ("3." and "3/" are neighbours), and
# two strings past str_key's 200 characters that only their full values order.
STRINGS_0007 = ["3.1", "3.10", "3/x", "30", "3", "Night", "night", "NIGHT", "é", "e", "Ž", "z", "a_b", "a%b"]
STRINGS_0007 += ["n" * 200 + "b", "n" * 200 + "a", "N" * 201]


def _str_collation(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT collation_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'property_index'"
                " AND column_name = 'str_key'"
            )
        ).scalar()


def _prefix_plan(engine: Engine) -> str:
    """How PostgreSQL's str_key index serves a prefix `like`'s range (the one `prefix_range`
    writes): its index conditions, with the other indexes dropped and sequential scans off
    inside a transaction that is rolled back, so the plan shows what that index can do rather
    than what a 20-row table's costs prefer."""
    with engine.connect() as conn, conn.begin() as transaction:
        conn.execute(text("DROP INDEX ix_property_index_num, ix_property_index_owner"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        rows = conn.execute(
            text(
                "EXPLAIN SELECT owner_id FROM property_index WHERE owner_kind = 'version' AND path = :p"
                " AND str_key COLLATE \"C\" >= '3.' AND str_key COLLATE \"C\" < '3/'"
            ),
            {"p": path_text(["s"])},
        ).scalars()
        plan = "\n".join(rows)
        transaction.rollback()
    assert "ix_property_index_str" in plan, plan
    return " ".join(line for line in plan.splitlines() if "Index Cond" in line)


def test_upgrading_to_0007_keeps_every_indexed_row_searchable(database_url: str) -> None:
    """0006 → 0007 on a filled index: str_key becomes COLLATE "C" on PostgreSQL and the value
    indexes gain owner_id; every search, prefix `like` and ordering by a string still equals the
    plain-Python evaluator over the rows written before the upgrade."""
    engine = make_engine(database_url)
    postgres = engine.dialect.name == "postgresql"
    versions = [(0, {"s": s, "n": i % 5, **({"t": s} if i % 3 else {})}) for i, s in enumerate(STRINGS_0007)]
    versions += [(0, {"n": "text"}), (0, {"s": 7}), (0, {})]
    try:
        upgrade(engine, "0006")
        if postgres:
            # The test database's default collation is C.UTF-8, close to code-point order; a
            # store created in a linguistic locale (en_US.UTF-8, the usual) is what 0007 changes.
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "ALTER TABLE property_index ALTER COLUMN str_key"
                        ' TYPE varchar(200) COLLATE "und-x-icu"'
                    )
                )
            assert _str_collation(engine) == "und-x-icu"
            assert "str_key" not in _prefix_plan(engine)  # the range is a filter, read row by row
        fill(engine, [{}], versions)  # the production index writer (`reindex`), at 0006
        upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
            assert context.get_current_revision() == head  # 0007 and every one after it
            assert compare_metadata(context, Base.metadata) == []
        indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("property_index")}
        assert indexes["ix_property_index_str"] == ["owner_kind", "path", "str_key", "owner_id"]
        assert indexes["ix_property_index_owner"] == ["owner_kind", "owner_id", "path"]
        if postgres:
            assert _str_collation(engine) == "C"
            assert "str_key" in _prefix_plan(engine)  # the range bounds the index scan
        items = [(i, name, props) for i, (_, name, props) in enumerate(version_names(versions))]
        long = "n" * 200
        filters = [
            "exists s",
            's like "3.%"',
            's like "3%"',
            's like "N%"',
            's like "n%"',
            's like "é%"',
            's like "a_b"',
            's ilike "3.%"',
            's ilike "night"',
            't like "3.%"',
            's < "N"',
            's >= "a"',
            's = "Night"',
            's in ("Night", "é", "3.1")',
            'not s like "3.%"',
            's like "3.%" or n = 1',
            f's like "{long}%"',
            f's = "{long}a"',
            f's > "{long}a"',
        ]
        with Session(engine) as session:
            for text_ in filters:
                node = parse(text_)
                want = [name for _, name, props in items if matches(node, props)]
                _, rows = list_versions(session, ListQuery(filter=text_, limit=100))
                assert [r.name for r in rows] == want, text_
            for ordering in ("s", "-s", "t", "n"):
                _, rows = list_versions(session, ListQuery(ordering=ordering, limit=100))
                assert [r.name for r in rows] == ordered(items, ordering), ordering
    finally:
        engine.dispose()


def _revision_before(migration_file: str, engine: Engine) -> str:
    """The revision a migration upgrades from, by its file name, so the test follows a re-chain."""
    scripts = ScriptDirectory.from_config(alembic_config(engine))
    (script,) = [s for s in scripts.walk_revisions() if s.path.endswith(migration_file)]
    down = script.down_revision
    assert isinstance(down, str)
    return down


def test_upgrading_moves_last_used_out_of_properties_and_history_into_its_column(
    database_url: str,
) -> None:
    """The last_used migration on a filled database: each stored `valohai.last-used` moves into
    the column, out of the property set; its history rows go, other history stays; the index row
    the old apply wrote still finds and sorts it, and the API shows it as before."""
    from datetime import UTC, datetime

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from worker.ids import new_id
    from worker.store import queries
    from worker.store.index import index_rows

    engine = make_engine(database_url)
    start = datetime(2026, 4, 1, tzinfo=UTC)
    used = {"dataset": "2026-05-03T00:00:00+00:00", "v1": "2026-05-02T00:00:00+00:00"}
    try:
        upgrade(engine, _revision_before("_last_used_column.py", engine))
        with engine.begin() as conn:
            dataset = {"domain": "d", "valohai.last-used": used["dataset"]}
            conn.execute(
                text(
                    "INSERT INTO datasets (id, uid, name, properties, created_at, updated_at)"
                    " VALUES (1, :u, 'ds', :p, :t, :t)"
                ),
                {"u": new_id(), "p": json.dumps(dataset), "t": start},
            )
            versions: dict[int, dict[str, Any]] = {1: {"n": 1, "valohai.last-used": used["v1"]}, 2: {"n": 2}}
            for i, properties in versions.items():
                conn.execute(
                    text(
                        "INSERT INTO dataset_versions (id, uid, dataset_id, name, status, properties,"
                        " created_at, updated_at) VALUES (:i, :u, 1, :n, 'building', :p, :t, :t)"
                    ),
                    {"i": i, "u": new_id(), "n": f"v{i}", "p": json.dumps(properties), "t": start},
                )
            rows = index_rows("dataset", 1, dataset)
            rows += [row for i, p in versions.items() for row in index_rows("version", i, p)]
            conn.execute(
                text(
                    "INSERT INTO property_index (owner_kind, owner_id, path, vtype, num, str_key,"
                    " str_value, str_lower, bool_value) VALUES (:owner_kind, :owner_id, :path, :vtype,"
                    " :num, :str_key, :str_value, :str_lower, :bool_value)"
                ),
                rows,
            )
            history = [
                ("dataset", 1, "valohai.last-used", used["dataset"]),
                ("version", 1, "valohai.last-used", used["v1"]),
                ("version", 1, "n", 1),
            ]
            source = json.dumps({"origin": "platform"})
            for kind, owner, key, new in history:
                conn.execute(
                    text(
                        "INSERT INTO property_changes (owner_kind, owner_id, key, old, new, source,"
                        " changed_at) VALUES (:k, :o, :key, NULL, :new, :s, :t)"
                    ),
                    {"k": kind, "o": owner, "key": key, "new": json.dumps(new), "s": source, "t": start},
                )
        upgrade(engine)
        with Session(engine) as session:
            ds = queries.get_dataset(session, 1)
            assert ds.properties == {"domain": "d"} and ds.last_used == used["dataset"]
            v1, v2 = queries.get_version(session, 1), queries.get_version(session, 2)
            assert v1.properties == {"n": 1} and v1.last_used == used["v1"]
            assert v2.properties == {"n": 2} and v2.last_used is None
            changes = session.execute(text("SELECT owner_kind, owner_id, key FROM property_changes")).all()
            assert [tuple(c) for c in changes] == [("version", 1, "n")]
            assert queries.version_json(session, v1)["properties"] == versions[1]
            (shown,) = queries.datasets_json(session, [ds])
            assert shown["properties"] == dataset
            ask = queries.ListQuery(filter='`valohai.last-used` > "2026-05-01"')
            assert [v.name for v in queries.list_versions(session, ask)[1]] == ["v1"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("defined", [True, False])
def test_upgrading_with_definitions_leaves_one_recheck_pending(database_url: str, defined: bool) -> None:
    """The definition_recheck migration: definitions made before it were re-checked by hand if
    at all, so it asks for one pass when any exist, and for none on a database without any."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from worker.status import recheck_report
    from worker.store import definitions

    engine = make_engine(database_url)
    try:
        upgrade(engine, _revision_before("_definition_recheck.py", engine))
        if defined:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO property_definitions (key, scopes, type, allowed_values, required,"
                        " description, display_name, enforcement, updated_at) VALUES ('n', :s, 'string',"
                        " '[]', :f, '', '', 'warn', :t)"
                    ),
                    {"s": json.dumps(["dataset"]), "f": False, "t": datetime(2026, 12, 1, tzinfo=UTC)},
                )
        upgrade(engine)
        assert recheck_report(engine)["state"] == ("pending" if defined else "current")
        assert definitions.recheck(engine).outcome == ("done" if defined else "current")
        assert recheck_report(engine)["state"] == "current"
    finally:
        engine.dispose()


def test_upgrading_names_the_execution_of_each_sidecar_history_row(database_url: str) -> None:
    """The made_by migration: history rows of sidecar lines written before it name their
    execution, so `sidecar rollback` finds them; API and platform rows name nothing."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    engine = make_engine(database_url)
    try:
        upgrade(engine, _revision_before("_history_made_by.py", engine))
        sources = [
            {"origin": "sidecar", "execution": "exec-1", "file": "f", "line": 1, "offset": 0},
            {"origin": "api"},
            {"origin": "platform"},
        ]
        with engine.begin() as conn:
            for i, source in enumerate(sources):
                conn.execute(
                    text(
                        "INSERT INTO property_changes (owner_kind, owner_id, key, old, new, source,"
                        " changed_at) VALUES ('version', 1, :key, NULL, '1', :s, :t)"
                    ),
                    {"key": f"k{i}", "s": json.dumps(source), "t": datetime(2026, 12, 1, tzinfo=UTC)},
                )
        upgrade(engine)
        with engine.connect() as conn:
            made_by = conn.execute(text("SELECT key, made_by FROM property_changes ORDER BY id")).all()
        assert [tuple(r) for r in made_by] == [("k0", "exec-1"), ("k1", None), ("k2", None)]
    finally:
        engine.dispose()
