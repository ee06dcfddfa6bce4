"""Property definitions in the database, and the process cache the apply reads them from."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from weakref import WeakKeyDictionary

import sqlalchemy.exc
from sqlalchemy import Connection, Engine, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from ..definitions import AllowedValue, Definition, as_json, rejected, violations
from ..errors import InvalidEntry, NotFound
from .db import writer
from .models import Dataset, DatasetVersion, Datum, DefinitionRecheck, PropertyDefinition
from .queries import iso

_TABLE = cast(Table, PropertyDefinition.__table__)
_STAMP = select(func.count(), func.max(_TABLE.c.updated_at))
_ALL = select(_TABLE)


@dataclass(frozen=True)
class Planned:
    """What `apply_definitions` does (or, dry, would do) to one key: added, changed, unchanged."""

    key: str
    action: str


def definition_of(row: Any) -> Definition:
    """A stored row (ORM object or Core row) as a Definition."""
    allowed = tuple(AllowedValue(a["value"], a.get("description") or "") for a in row.allowed_values or [])
    return Definition(
        key=row.key,
        scopes=tuple(row.scopes),
        type=row.type,
        allowed_values=allowed,
        required=bool(row.required),
        description=row.description or "",
        display_name=row.display_name or "",
        enforcement=row.enforcement,
    )


def _columns(definition: Definition, now: datetime) -> dict[str, Any]:
    shown = definition.as_json()
    return {**shown, "updated_at": now}


# -- the cache the apply reads -------------------------------------------------------------------

# Per connection pool (an engine and its `writer` share one): a stamp of the definitions when
# read (the generation every change moves, and the table's count and newest updated_at, in case a
# row is written some other way), and the definitions then. One cheap read per apply tells
# whether the cached copy is current; nothing here waits on anything but that read.
_CACHE: WeakKeyDictionary[Pool, tuple[tuple[Any, ...], dict[str, Definition]]] = WeakKeyDictionary()
_LOCK = threading.Lock()
_STATE = cast(Table, DefinitionRecheck.__table__)
_ROW = _STATE.c.id == 1
# The race: an apply that read the old definitions commits after the re-check read its rows, and
# its violations (of the old definitions) would stay. So on PostgreSQL an apply reads the
# generation FOR KEY SHARE and keeps it to its commit, and a change takes the row FOR UPDATE
# first: a change waits for the applies that read the definitions before it, and an apply that
# reads them after waits for the change's commit (and sees it). The re-check starts after that
# commit and sees every row written with the old ones. The re-check's own progress writes are
# plain UPDATEs (FOR NO KEY UPDATE), which KEY SHARE does not block. SQLite has one writer at a
# time (`BEGIN IMMEDIATE`), so there a change and an apply never overlap.
_GENERATION = select(_STATE.c.generation).where(_ROW)
_GENERATION_HELD = _GENERATION.with_for_update(read=True, key_share=True)


def load(conn: Connection, *, hold: bool = True) -> Mapping[str, Definition]:
    """Every definition by key, from the process cache when nothing changed since. `hold` (the
    apply): on PostgreSQL, a definition change waits for this transaction's end (see above)."""
    held = hold and conn.dialect.name == "postgresql"
    generation = conn.execute(_GENERATION_HELD if held else _GENERATION).scalar()
    stamp = (generation, *conn.execute(_STAMP).one())
    if stamp[1] == 0:
        return {}
    with _LOCK:
        cached = _CACHE.get(conn.engine.pool)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    found = {row.key: definition_of(row) for row in conn.execute(_ALL)}
    with _LOCK:
        _CACHE[conn.engine.pool] = (stamp, found)
    return found


def _changed(conn: Connection, now: datetime) -> None:
    """A definition change, before its rows are written: wait for the applies that read the
    definitions (PostgreSQL, FOR UPDATE), and ask for a re-check (the generation moves)."""
    locked = conn.execute(select(_STATE.c.id).where(_ROW).with_for_update()).scalar()
    if locked is None:  # tables made some other way than the models and migrations
        conn.execute(insert(_STATE).values(id=1, **_ZERO, generation=0, checked_generation=0))
    conn.execute(update(_STATE).where(_ROW).values(generation=_STATE.c.generation + 1, requested_at=now))


_ZERO = {"after_id": 0, "total": 0, "checked": 0, "changed": 0, "violating": 0}


def owner_violations(
    definitions: Mapping[str, Definition], kind: str, properties: Mapping[str, Any], status: str | None
) -> list[dict[str, Any]]:
    """An owner's `violations` column: its set checked whole; `required` once a version completed
    (datasets and datums: always)."""
    complete = kind != "version" or status == "completed"
    return as_json(violations(definitions, kind, properties, complete=complete))


def refuse_rejected(engine: Engine, kind: str, changes: Mapping[str, Any]) -> None:
    """An API write: InvalidEntry (a 400 naming the key and rule) if a `reject` definition refuses
    one of its changes, before anything is staged."""
    with engine.connect() as conn:
        definitions = load(conn, hold=False)
    broken = rejected(definitions, kind, changes)
    if broken:
        raise InvalidEntry(broken[0].reason(), broken[0].key)


# -- reads and writes for the API and the CLI ----------------------------------------------------


def listed(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.scalars(select(PropertyDefinition).order_by(PropertyDefinition.key))
        return [shown(r) for r in rows]


def get(engine: Engine, key: str) -> dict[str, Any]:
    with Session(engine) as session:
        row = session.get(PropertyDefinition, key)
        if row is None:
            raise NotFound(f"property definition {key[:100]!r}")
        return shown(row)


def put(engine: Engine, definition: Definition) -> tuple[dict[str, Any], bool, bool]:
    """Create or replace one definition: (it as shown, whether it is new, whether it changed)."""
    try:
        (planned,) = apply_definitions(engine, [definition])
    except sqlalchemy.exc.IntegrityError:  # a PUT of the same new key committed first: replace it
        (planned,) = apply_definitions(engine, [definition])
    return get(engine, definition.key), planned.action == "added", planned.action != "unchanged"


def remove(engine: Engine, key: str) -> None:
    with Session(writer(engine)) as session, session.begin():
        if session.get(PropertyDefinition, key) is None:
            raise NotFound(f"property definition {key[:100]!r}")
        _changed(session.connection(), datetime.now(UTC))
        session.execute(delete(PropertyDefinition).where(PropertyDefinition.key == key))


def apply_definitions(
    engine: Engine, definitions: list[Definition], *, dry_run: bool = False
) -> list[Planned]:
    """Upsert a list of definitions in one transaction (keys not listed stay as they are); what
    each key's row did. A definition equal to the stored one is not written (its `updated_at`
    stays, so the apply's cache stays valid)."""
    now = datetime.now(UTC)
    planned: list[Planned] = []
    asked = False  # for a re-check: once per transaction
    with Session(engine if dry_run else writer(engine)) as session:
        for definition in definitions:
            row = session.get(PropertyDefinition, definition.key)
            if row is not None and definition_of(row) == definition:
                planned.append(Planned(definition.key, "unchanged"))
                continue
            planned.append(Planned(definition.key, "changed" if row is not None else "added"))
            if dry_run:
                continue
            if not asked:
                _changed(session.connection(), now)
                asked = True
            if row is None:
                session.add(PropertyDefinition(**_columns(definition, now)))
            else:
                for name, value in _columns(definition, now).items():
                    setattr(row, name, value)
        if not dry_run:
            session.commit()
    return planned


def shown(row: PropertyDefinition) -> dict[str, Any]:
    return {**definition_of(row).as_json(), "updated_at": iso(row.updated_at)}


# -- re-checking what is stored ------------------------------------------------------------------

_OWNERS: tuple[tuple[str, Table], ...] = (
    ("dataset", cast(Table, Dataset.__table__)),
    ("version", cast(Table, DatasetVersion.__table__)),
    ("datum", cast(Table, Datum.__table__)),
)


@dataclass
class Rechecked:
    """What `recheck` did: owners read, owners whose violations changed, owners now violating;
    `outcome`: "done", "current" (nothing to do) or "elsewhere" (another re-check runs)."""

    checked: int = 0
    changed: int = 0
    violating: int = 0
    outcome: str = "done"


def recheck(engine: Engine, *, batch: int = 500, force: bool = False) -> Rechecked:
    """Check every dataset, version and datum against the definitions as they are now, and write
    the `violations` that changed; until a whole pass saw no definition change. A batch per
    transaction (applies are never held long), each committing its cursor: a re-check killed
    midway resumes there. `force`: a pass even if the last one covered the current generation."""
    while True:
        state = recheck_state(engine)
        generation = state["generation"]
        if not force and state["checked_generation"] >= generation:
            return Rechecked(outcome="current")
        # The pass of this generation that a killed worker left (at its end, phase is None and
        # only the finish is missing), unless asked for a new one.
        resume = state["run_generation"] == generation and not force
        force = False
        cursor = (state["phase"], state["after_id"]) if resume else _start(engine, generation)
        done = _run(engine, generation, cursor, batch)
        if done is not None:
            return done


def _start(engine: Engine, generation: int) -> tuple[str | None, int]:
    now = datetime.now(UTC)
    with writer(engine).begin() as conn:
        total = sum(conn.execute(select(func.count()).select_from(t)).scalar() or 0 for _, t in _OWNERS)
        conn.execute(
            update(_STATE)
            .where(_ROW)
            .values(
                **{**_ZERO, "total": total},
                run_generation=generation,
                phase=_OWNERS[0][0],
                started_at=now,
                progress_at=now,
                finished_at=None,
            )
        )
    return _OWNERS[0][0], 0


def _run(engine: Engine, generation: int, cursor: tuple[str | None, int], batch: int) -> Rechecked | None:
    """Batches from `cursor` to the end: the totals, or None when the definitions changed
    meanwhile (start again), or "elsewhere" when another re-check moved the cursor."""
    while True:
        with writer(engine).begin() as conn:
            state = conn.execute(select(_STATE).where(_ROW).with_for_update(key_share=True)).one()
            if state.generation != generation:
                return None
            if state.run_generation != generation or (state.phase, state.after_id) != cursor:
                return Rechecked(outcome="elsewhere")
            kind, after = cursor
            if kind is None:
                return _finish(conn, state)
            cursor = _step(conn, kind, after, batch)


def _step(conn: Connection, kind: str, after: int, batch: int) -> tuple[str | None, int]:
    """One batch of owners of `kind` after id `after`, checked and written with the progress;
    the next cursor (None: every owner was checked)."""
    table = dict(_OWNERS)[kind]
    rows = conn.execute(_batch(table, kind), {"after": after, "size": batch}).all()
    done = Rechecked()
    found = load(conn, hold=False)
    for row in rows:
        _recheck_row(conn, table, kind, found, row, done)
    phases = [k for k, _ in _OWNERS]
    following = phases.index(kind) + 1
    if len(rows) == batch:
        cursor: tuple[str | None, int] = (kind, rows[-1].id)
    else:
        cursor = (phases[following] if following < len(phases) else None, 0)
    conn.execute(
        update(_STATE)
        .where(_ROW)
        .values(
            phase=cursor[0],
            after_id=cursor[1],
            checked=_STATE.c.checked + done.checked,
            changed=_STATE.c.changed + done.changed,
            violating=_STATE.c.violating + done.violating,
            progress_at=datetime.now(UTC),
        )
    )
    return cursor


def _finish(conn: Connection, state: Any) -> Rechecked:
    conn.execute(
        update(_STATE)
        .where(_ROW)
        .values(checked_generation=state.run_generation, finished_at=datetime.now(UTC))
    )
    return Rechecked(state.checked, state.changed, state.violating)


def recheck_state(engine: Engine) -> dict[str, Any]:
    """The re-check's row as `sidecar status` shows it (times as ISO text there)."""
    with engine.connect() as conn:
        row = conn.execute(select(_STATE).where(_ROW)).one_or_none()
    if row is None:
        return {
            "generation": 0,
            "checked_generation": 0,
            "run_generation": None,
            "phase": None,
            "after_id": 0,
        }
    return dict(row._mapping)


def count_violations(engine: Engine) -> Rechecked:
    """A dry re-check: what a pass would change now, writing nothing."""
    done = Rechecked()
    with engine.connect() as conn:
        found = load(conn, hold=False)
        for kind, table in _OWNERS:
            after = 0
            while True:
                rows = conn.execute(_batch(table, kind), {"after": after, "size": 1000}).all()
                for row in rows:
                    _recheck_row(None, table, kind, found, row, done)
                if len(rows) < 1000:
                    break
                after = rows[-1].id
    return done


def _batch(table: Table, kind: str) -> Any:
    columns = [table.c.id, table.c.properties, table.c.violations, table.c.updated_at]
    if kind == "version":
        columns.append(table.c.status)
    return (
        select(*columns).where(table.c.id > bindparam("after")).order_by(table.c.id).limit(bindparam("size"))
    )


def _recheck_row(
    conn: Connection | None,
    table: Table,
    kind: str,
    found: Mapping[str, Definition],
    row: Any,
    done: Rechecked,
) -> None:
    status = row.status if kind == "version" else None
    now = owner_violations(found, kind, row.properties or {}, status)
    done.checked += 1
    done.violating += bool(now)
    if now == list(row.violations or []):
        return
    done.changed += 1
    if conn is not None:
        # Only if the row is as read. An apply that wrote it since (or is writing it: PostgreSQL
        # waits for its commit, then checks the new row) moved `updated_at`, and it read the
        # definitions after the change (see `load`), so its violations are the current ones.
        conn.execute(
            update(table)
            .where(table.c.id == row.id, table.c.updated_at == row.updated_at)
            .values(violations=now)
        )
