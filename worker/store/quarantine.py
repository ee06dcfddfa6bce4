"""The durable record of quarantined targets (Redis holds them; see `Staging.quarantine`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import outbox
from .db import writer
from .models import QuarantinedTarget

_TABLE = cast(Table, QuarantinedTarget.__table__)


def record(engine: Engine, target: str, error: str, attempts: int, at: datetime) -> None:
    """Write (or refresh) a target's quarantine row, in a transaction of its own: the apply's
    transaction has been rolled back by then. Its `target.quarantined` event goes in the same
    transaction."""
    insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    row = {"target": target, "error": error, "attempts": attempts, "quarantined_at": at}
    statement = insert(_TABLE).values(row)
    statement = statement.on_conflict_do_update(
        index_elements=[_TABLE.c.target],
        set_={k: statement.excluded[k] for k in ("error", "attempts", "quarantined_at")},
    )
    with writer(engine).begin() as conn:
        conn.execute(statement)
        outbox.record_quarantine(conn, target, error, attempts, at)  # a notification, if wanted


def remove(engine: Engine, targets: list[str]) -> None:
    """Forget the quarantine rows of `targets` (`sidecar retry`)."""
    with writer(engine).begin() as conn:
        conn.execute(delete(_TABLE).where(_TABLE.c.target.in_(targets)))


def listed(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every quarantine row: target -> error, attempts, at (ISO)."""
    with engine.connect() as conn:
        rows = conn.execute(select(_TABLE).order_by(_TABLE.c.target)).all()
    return {
        r.target: {"error": r.error, "attempts": r.attempts, "at": r.quarantined_at.isoformat()} for r in rows
    }
