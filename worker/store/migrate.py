"""Schema migrations with Alembic (`worker/migrations/`), run from code: `sidecar db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

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

    The API, the workers and `sidecar up` may all run this at start; on PostgreSQL an advisory
    lock makes them take turns, since two migrations racing on a fresh database would collide.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_ID})")
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def revision(engine: Engine, message: str) -> None:
    """Autogenerate a new migration from the models (for developers: `sidecar db revision -m`)."""
    command.revision(alembic_config(engine), message=message, autogenerate=True)
