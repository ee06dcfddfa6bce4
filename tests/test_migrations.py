"""Migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from worker.store.db import make_engine
from worker.store.migrate import upgrade
from worker.store.models import Base


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

    from sqlalchemy import text
    from sqlalchemy.orm import Session

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
