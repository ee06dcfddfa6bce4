"""Property definitions in the database, and the process cache the apply reads them from."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from weakref import WeakKeyDictionary

import sqlalchemy.exc
from sqlalchemy import Connection, Engine, Table, bindparam, delete, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from ..definitions import AllowedValue, Definition, as_json, rejected, violations
from ..errors import InvalidEntry, NotFound
from .db import writer
from .models import Dataset, DatasetVersion, Datum, PropertyDefinition
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

# Per connection pool (an engine and its `writer` share one): (count, newest updated_at) of the
# table when read, and the definitions then. Every definition write moves that stamp (a put sets
# a newer updated_at, a delete lowers the count), so one cheap aggregate per apply tells whether
# the cached copy is current; nothing here waits on anything but that one read.
_CACHE: WeakKeyDictionary[Pool, tuple[tuple[Any, Any], dict[str, Definition]]] = WeakKeyDictionary()
_LOCK = threading.Lock()


def load(conn: Connection) -> Mapping[str, Definition]:
    """Every definition by key, from the process cache when the table has not changed since."""
    stamp = tuple(conn.execute(_STAMP).one())
    if stamp[0] == 0:
        return {}
    with _LOCK:
        cached = _CACHE.get(conn.engine.pool)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    found = {row.key: definition_of(row) for row in conn.execute(_ALL)}
    with _LOCK:
        _CACHE[conn.engine.pool] = (stamp, found)
    return found


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
        definitions = load(conn)
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


def put(engine: Engine, definition: Definition) -> tuple[dict[str, Any], bool]:
    """Create or replace one definition: (it as shown, whether it is new)."""
    try:
        (planned,) = apply_definitions(engine, [definition])
    except sqlalchemy.exc.IntegrityError:  # a PUT of the same new key committed first: replace it
        (planned,) = apply_definitions(engine, [definition])
    return get(engine, definition.key), planned.action == "added"


def remove(engine: Engine, key: str) -> None:
    with Session(writer(engine)) as session, session.begin():
        if session.get(PropertyDefinition, key) is None:
            raise NotFound(f"property definition {key[:100]!r}")
        session.execute(delete(PropertyDefinition).where(PropertyDefinition.key == key))


def apply_definitions(
    engine: Engine, definitions: list[Definition], *, dry_run: bool = False
) -> list[Planned]:
    """Upsert a list of definitions in one transaction (keys not listed stay as they are); what
    each key's row did. A definition equal to the stored one is not written (its `updated_at`
    stays, so the apply's cache stays valid)."""
    now = datetime.now(UTC)
    planned: list[Planned] = []
    with Session(engine if dry_run else writer(engine)) as session:
        for definition in definitions:
            row = session.get(PropertyDefinition, definition.key)
            if row is not None and definition_of(row) == definition:
                planned.append(Planned(definition.key, "unchanged"))
                continue
            planned.append(Planned(definition.key, "changed" if row is not None else "added"))
            if dry_run:
                continue
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
    """What `recheck` did: owners read, owners whose violations changed, owners now violating."""

    checked: int = 0
    changed: int = 0
    violating: int = 0


def recheck(engine: Engine, *, batch: int = 500, dry_run: bool = False) -> Rechecked:
    """Check every dataset, version and datum against the definitions as they are now, and write
    the `violations` that changed. A batch per transaction, so applies are never held long."""
    done = Rechecked()
    for kind, table in _OWNERS:
        after = 0
        while True:
            with writer(engine).begin() as conn:
                found = load(conn)
                rows = conn.execute(_batch(table, kind), {"after": after, "size": batch}).all()
                for row in rows:
                    _recheck_row(conn, table, kind, found, row, done, dry_run)
            if len(rows) < batch:
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
    conn: Connection,
    table: Table,
    kind: str,
    found: Mapping[str, Definition],
    row: Any,
    done: Rechecked,
    dry_run: bool,
) -> None:
    status = row.status if kind == "version" else None
    now = owner_violations(found, kind, row.properties or {}, status)
    done.checked += 1
    done.violating += bool(now)
    if now == list(row.violations or []):
        return
    done.changed += 1
    if not dry_run:
        # Only if the row is as read: an apply that changed its properties since (updated_at
        # moves) wrote violations of its own, from the same definitions or newer ones.
        conn.execute(
            update(table)
            .where(table.c.id == row.id, table.c.updated_at == row.updated_at)
            .values(violations=now)
        )
