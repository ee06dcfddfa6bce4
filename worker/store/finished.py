"""What outlives an execution's staging state in Redis: finished files and executions.

Retention (worker/retention.py) writes these before it deletes the Redis keys; the watcher and
replay read them when Redis has no checkpoint for a file. SQL only; no Redis in here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, inspect, select
from sqlalchemy import null as sa_null
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .db import writer
from .models import FinishedExecution, FinishedFile, Watermark

_FILES = cast(Table, FinishedFile.__table__)
_EXECUTIONS = cast(Table, FinishedExecution.__table__)
_MARKS = cast(Table, Watermark.__table__)

_SELECT_FILE = (
    select(
        _FILES.c.file,
        _FILES.c.execution,
        _FILES.c.state,
        _FILES.c.digests,
        _EXECUTIONS.c.completed_at,
        _EXECUTIONS.c.flags,
    )
    .join(_EXECUTIONS, _EXECUTIONS.c.execution == _FILES.c.execution)
    .where(_FILES.c.file == bindparam("file"))
)
_SELECT_EXECUTION = select(
    _EXECUTIONS.c.execution,
    sa_null().label("state"),
    sa_null().label("digests"),
    _EXECUTIONS.c.completed_at,
    _EXECUTIONS.c.flags,
).where(_EXECUTIONS.c.execution == bindparam("execution"))


@dataclass(frozen=True)
class FinishedRecord:
    """A finished file, with what its execution needs to be put back in Redis."""

    file: str
    execution: str
    state: str  # the file's last checkpoint ("" for a file its execution never staged from)
    digests: bytes
    completed_ms: int | None  # None: forgotten before it completed (its folder was deleted)
    flags: dict[str, str]  # completed version -> its done flag's value


def ready(engine: Engine) -> bool:
    """True if the database has the tables (a database never migrated holds no finished file)."""
    return bool(inspect(engine).has_table(_FILES.name))


def find(engine: Engine, file: str) -> FinishedRecord | None:
    """The record of a finished file, or None (never finished, or never forgotten)."""
    with engine.connect() as conn:
        row: Any = conn.execute(_SELECT_FILE, {"file": file}).first()
        if row is None:
            # A file that appeared after its execution was forgotten (completed before it wrote
            # anything, say): no checkpoint, but the completion must come back with its lines.
            row = conn.execute(_SELECT_EXECUTION, {"execution": file.split("/", 1)[0]}).first()
    if row is None:
        return None
    completed = row.completed_at
    if completed is not None and completed.tzinfo is None:  # SQLite hands back naive times
        completed = completed.replace(tzinfo=UTC)
    return FinishedRecord(
        file,
        row.execution,
        row.state or "",
        bytes(row.digests or b""),
        None if completed is None else int(completed.timestamp() * 1000),
        dict(row.flags or {}),
    )


def watermarks(engine: Engine, targets: Iterable[str]) -> dict[str, str | None]:
    """Each target's applied watermark (None: nothing applied, or no row)."""
    wanted = sorted(set(targets))
    if not wanted:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(select(_MARKS.c.target, _MARKS.c.stream_id).where(_MARKS.c.target.in_(wanted)))
        found = {r.target: r.stream_id for r in rows}
    return {t: found.get(t) for t in wanted}


def save(
    engine: Engine,
    execution: str,
    *,
    completed_ms: int | None,
    flags: Mapping[str, str],
    files: Mapping[str, tuple[str, bytes]],
) -> None:
    """Record an execution and its files (file -> (checkpoint, digests)) in one transaction.

    Upserts: retention may run again for an execution put back in Redis by a late line; the
    newest checkpoint wins, and the version flags of both times are kept.
    """
    now = datetime.now(UTC)
    completed = None if completed_ms is None else datetime.fromtimestamp(completed_ms / 1000, UTC)
    insert: Any = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
    # The write lock first (`writer`: BEGIN IMMEDIATE on SQLite). A deferred transaction that
    # reads and then writes fails at once with "database is locked" when a worker's apply
    # commits between the two, whatever the busy timeout (WAL cannot upgrade a stale snapshot).
    with writer(engine).begin() as conn:
        old = conn.scalar(select(_EXECUTIONS.c.flags).where(_EXECUTIONS.c.execution == execution))
        row = {
            "execution": execution,
            "completed_at": completed,
            "flags": {**(old or {}), **flags},
            "finished_at": now,
        }
        stmt = insert(_EXECUTIONS).values(row)
        excluded = stmt.excluded
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[_EXECUTIONS.c.execution],
                set_={"completed_at": excluded.completed_at, "flags": excluded.flags, "finished_at": now},
            )
        )
        if files:
            rows = [
                {"file": f, "execution": execution, "state": s, "digests": d, "finished_at": now}
                for f, (s, d) in files.items()
            ]
            stmt = insert(_FILES)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[_FILES.c.file],
                    set_={
                        "execution": stmt.excluded.execution,
                        "state": stmt.excluded.state,
                        "digests": stmt.excluded.digests,
                        "finished_at": stmt.excluded.finished_at,
                    },
                ),
                rows,
            )
