"""The SQL of bulk edits by filter: their rows (`bulk_edits`) and the owners an edit matches,
taken batch by batch in id order after its cursor.

`worker/bulk.py` stages and applies each batch; this module only reads and records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, func, select, update
from sqlalchemy.orm import Session

from ..errors import NotFound
from ..ids import looks_like_id, new_id
from ..uris import Target
from .datums import DatumQuery
from .db import writer
from .models import BulkEdit, Dataset, DatasetVersion, Datum, Watermark
from .queries import OWNER_ROWS, ListQuery, iso
from .search import OwnerKind
from .sets import Ask, owner_ids

_EDITS = cast(Table, BulkEdit.__table__)
_DATASETS = cast(Table, Dataset.__table__)
_VERSIONS = cast(Table, DatasetVersion.__table__)
_DATUMS = cast(Table, Datum.__table__)
_MARKS = cast(Table, Watermark.__table__)
_TABLES = {"dataset": _DATASETS, "version": _VERSIONS, "datum": _DATUMS}


@dataclass(frozen=True)
class Matched:
    """One owner a bulk edit matched: its staging target (and a datum's path), its properties
    now, and whether a write to it applies at once (`completed`: a dataset, a completed
    version, a datum of an execution the database has applied once)."""

    kind: str
    id: int
    uid: str
    target: Target
    properties: dict[str, Any]
    completed: bool
    path: str = ""


def ask_of(kind: OwnerKind, text: str) -> Ask:
    """The set a bulk edit's filter names, as the list of its kind would name it."""
    return DatumQuery(filter=text) if kind == "datum" else ListQuery(filter=text)


def matched(session: Session, kind: OwnerKind, text: str, after: int, limit: int) -> list[Matched]:
    """Up to `limit` owners of `kind` matching the filter `text`, with ids above `after`, in id
    order. FilterError if the filter does not parse.

    The filter is evaluated again for each batch: an owner that starts matching after the
    cursor passed its id is not edited, one that stops matching before it is reached is not.
    """
    ids = owner_ids(session, kind, ask_of(kind, text))
    if ids is False:
        return []
    table = _TABLES[kind]
    query: Any = select(table.c.id) if ids is None else ids
    page: Any = query.where(table.c.id > after).order_by(table.c.id).limit(limit)
    wanted: list[int] = list(session.scalars(page))
    if not wanted:
        return []
    conn = session.connection()
    if kind == "dataset":
        return [
            Matched("dataset", r.id, r.uid, Target("dataset", r.name), r.properties or {}, True)
            for r in conn.execute(OWNER_ROWS["dataset"], {"ids": wanted})
        ]
    if kind == "version":
        return [
            Matched(
                "version",
                r.id,
                r.uid,
                Target("version", r.dataset, r.name),
                r.properties or {},
                r.status == "completed",
            )
            for r in conn.execute(OWNER_ROWS["version"], {"ids": wanted})
        ]
    rows = list(conn.execute(OWNER_ROWS["datum"], {"ids": wanted}))
    targets = {r.execution: Target.for_execution(r.execution) for r in rows}
    applied = _applied_once(conn, [t.key for t in targets.values()])
    return [
        Matched(
            "datum",
            r.id,
            r.uid,
            targets[r.execution],
            r.properties or {},
            targets[r.execution].key in applied,
            r.path,
        )
        for r in rows
    ]


def _applied_once(conn: Connection, keys: list[str]) -> set[str]:
    """The target keys among `keys` that have a watermark row (applied at least once)."""
    return set(conn.scalars(select(_MARKS.c.target).where(_MARKS.c.target.in_(keys))))


def create(engine: Engine, kind: str, text: str, changes: dict[str, Any], total: int) -> str:
    """Record a new bulk edit (queued); its id."""
    with writer(engine).begin() as conn:
        row = conn.execute(
            _EDITS.insert().returning(_EDITS.c.id),
            {
                "id": new_id(),
                "kind": kind,
                "filter": text,
                "changes": changes,
                "state": "queued",
                "total": total,
                "after_id": 0,
                "done": 0,
                "applied": 0,
                "staged": 0,
                "error": "",
                "created_at": datetime.now(UTC),
            },
        ).scalar_one()
    return str(row)


def load(engine: Engine, ident: str) -> BulkEdit:
    """A bulk edit by id (detached); NotFound if there is none."""
    if not looks_like_id(ident):
        raise NotFound(f"bulk edit {ident[:100]}")
    with Session(engine, expire_on_commit=False) as session:
        row = session.get(BulkEdit, ident)
        if row is None:
            raise NotFound(f"bulk edit {ident[:100]}")
        session.expunge(row)
        return row


def start(engine: Engine, ident: str) -> None:
    """A queued edit is running now (a resumed one keeps its first start)."""
    with writer(engine).begin() as conn:
        now = datetime.now(UTC)
        conn.execute(
            update(_EDITS)
            .where(_EDITS.c.id == ident, _EDITS.c.state.in_(("queued", "running")))
            .values(state="running", started_at=func.coalesce(_EDITS.c.started_at, now), progress_at=now)
        )


def advance(engine: Engine, ident: str, after: int, done: int, applied: int, staged: int) -> None:
    """Move the cursor past a finished batch and count it (one statement, after the batch's
    apply committed: a crash in between makes the resumed edit stage that batch again, which
    sets the same values once more)."""
    with writer(engine).begin() as conn:
        conn.execute(
            update(_EDITS)
            .where(_EDITS.c.id == ident)
            .values(
                after_id=after,
                done=_EDITS.c.done + done,
                applied=_EDITS.c.applied + applied,
                staged=_EDITS.c.staged + staged,
                progress_at=datetime.now(UTC),
            )
        )


def finish(engine: Engine, ident: str, state: str, error: str = "") -> None:
    """The edit is over: `done`, or `failed` with its error."""
    with writer(engine).begin() as conn:
        now = datetime.now(UTC)
        conn.execute(
            update(_EDITS)
            .where(_EDITS.c.id == ident)
            .values(state=state, error=error[:2000], finished_at=now, progress_at=now)
        )


def edit_json(row: BulkEdit) -> dict[str, Any]:
    """The API's answer for one bulk edit (`GET /api/v0/bulk/<id>/`)."""
    return {
        "id": row.id,
        "kind": row.kind,
        "filter": row.filter,
        "set": row.changes,
        "state": row.state,
        "total": row.total,
        "done": row.done,
        "applied": row.applied,
        "staged": row.staged,
        "error": row.error or None,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at) if row.started_at else None,
        "progress_at": iso(row.progress_at) if row.progress_at else None,
        "finished_at": iso(row.finished_at) if row.finished_at else None,
    }
