"""Schema migrations with Alembic (`worker/migrations/`), run from code: `sidecar db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine

from worker.store.db import writer

SCHEMA_LOCK_ID = 0x5DEC_A2  # any constant shared by every sidecar process


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent.parent / "migrations"))
    config.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` (idempotent).

    The API, the workers and `sidecar up` may all run this at start, and two migrations racing on a
    fresh database would collide, so they take turns: on PostgreSQL through an advisory lock, on
    SQLite by taking the write lock up front (`BEGIN IMMEDIATE`, waiting out the busy timeout). The
    second one then finds the schema at head and writes nothing.
    """
    with writer(engine).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A migration that changes a column on SQLite copies the table, drops the old one and
            # renames the copy ("batch" mode); with foreign keys on, dropping a table that others
            # refer to fails. The pragma is ignored inside a transaction, so it goes first, and
            # `foreign_key_check` proves every reference still holds before the commit.
            _pragma(connection, "foreign_keys=OFF")  # on the driver: SQLAlchemy would BEGIN first
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_ID})")
                config = alembic_config(engine)
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left {len(broken)} broken references: {broken[:5]}")
        finally:
            if sqlite:
                _pragma(connection, "foreign_keys=ON")


def _pragma(connection: Connection, pragma: str) -> None:
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA {pragma}")


def revision(engine: Engine, message: str) -> None:
    """Autogenerate a new migration from the models (for developers: `sidecar db revision -m`)."""
    command.revision(alembic_config(engine), message=message, autogenerate=True)
