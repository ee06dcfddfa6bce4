"""Datums (one file of one execution) for the API and the CLI: find, list, search, write, alias.

A datum's properties come from its execution's datum lines and are applied with the execution
target (`execution:<id>`) when the execution completes. An API write goes the same way: staged on
the execution target while the execution runs (applied at completion, in order with its lines),
applied at once, through that target's stream and apply, once it has completed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, bindparam, func, select, text
from sqlalchemy.orm import Session

from .. import limits
from ..datum_keys import ALIAS_KEY, TAGS_KEY, alias_problem
from ..errors import InvalidEntry, NotFound, ReservedKey
from ..records import RESERVED_PREFIX, Entry, check_properties
from ..uris import Target
from . import queries
from .apply import Applier, lock_watermarks
from .db import writer
from .models import AliasChange, Datum, DatumAlias, Watermark
from .queries import datum_json, iso

log = logging.getLogger(__name__)

DATUM_KEYS = (TAGS_KEY, ALIAS_KEY)  # the `valohai.` keys a user may write on a datum
_OWNER_ID: Any = Datum.id  # the column the search compiles against


@dataclass(frozen=True)
class DatumQuery:
    """What a datum list asks for: exact matches, a filter expression, an ordering, a page."""

    execution: str | None = None
    name: str | None = None
    tag: str | None = None
    filter: str | None = None
    ordering: str | None = None
    limit: int = 100
    offset: int = 0


def get_datum(session: Session, ident: str | int) -> Datum:
    """A datum by its public id (or its integer id); NotFound for anything else."""
    return queries.get_datum(session, ident)


def list_datums(session: Session, ask: DatumQuery) -> tuple[int, list[Datum]]:
    """Datums matching `ask`; FilterError if its filter or ordering does not parse. Ordered by
    `id` (creation), `name` (path), `ctime`, `mtime`, or a property, as datasets and versions."""
    where = datum_where(ask, session.get_bind().dialect.name)
    query = select(Datum).where(*where)
    ids = select(Datum.id).where(*where) if where else None
    page = queries.ListQuery(filter=ask.filter, ordering=ask.ordering, limit=ask.limit, offset=ask.offset)
    # The list machinery of datasets and versions (filter as id sets, field or property ordering).
    fields = queries.list_fields(Datum, Datum.path)
    count, rows = queries.list_page(session, query, ids, page, "datum", _OWNER_ID, fields)
    return count, rows


def datum_where(ask: DatumQuery, dialect: str) -> list[Any]:
    """The conditions of `ask`'s exact matches (execution, path, tag), before its filter."""
    where: list[Any] = []
    if ask.execution is not None:
        where.append(Datum.execution == ask.execution)
    if ask.name is not None:
        where.append(Datum.path == ask.name)
    if ask.tag is not None:
        where.append(_has_tag(ask.tag, dialect))
    return where


def datum_ids(session: Session, ask: DatumQuery) -> Any:
    """The ids of the datums `ask` lists (its exact matches and filter), as a query; None if
    none. FilterError if the filter does not parse."""
    where = datum_where(ask, session.get_bind().dialect.name)
    query = select(Datum.id).where(*where)
    return queries.narrow(session, query, query if where else None, ask.filter, "datum", _OWNER_ID)


def _has_tag(tag: str, dialect: str) -> Any:
    """The datum's `valohai.tags` list holds `tag` (bound parameter; both dialects alike)."""
    if dialect == "postgresql":
        clause = text("(datums.properties -> 'valohai.tags') @> CAST(:tag_json AS jsonb)")
        return clause.bindparams(bindparam("tag_json", orjson.dumps([tag]).decode()))
    clause = text(
        "json_type(datums.properties, '$.\"valohai.tags\"') = 'array' AND EXISTS (SELECT 1 FROM "
        "json_each(datums.properties, '$.\"valohai.tags\"') AS t WHERE t.type = 'text' AND t.value = :tag)"
    )
    return clause.bindparams(bindparam("tag", tag))


def datums_json(session: Session, rows: list[Datum]) -> list[dict[str, Any]]:
    """`datum_json` of each row, with its alias."""
    aliases = queries.datum_aliases_of(session, [r.id for r in rows])
    return [datum_json(r, aliases.get(r.id)) for r in rows]


def one_json(session: Session, row: Datum) -> dict[str, Any]:
    return datums_json(session, [row])[0]


# -- aliases ---------------------------------------------------------------------------------


def list_aliases(session: Session, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Datum aliases by name: `{id, name, ctime, mtime, datum}`."""
    count = session.scalar(select(func.count()).select_from(DatumAlias)) or 0
    rows = session.execute(
        select(DatumAlias, Datum)
        .join(Datum, Datum.id == DatumAlias.datum_id)
        .order_by(DatumAlias.name)
        .limit(limit)
        .offset(offset)
    ).all()
    return count, [alias_json(alias, datum) for alias, datum in rows]


def alias_json(alias: DatumAlias, datum: Datum) -> dict[str, Any]:
    return {
        "id": alias.uid,
        "name": alias.name,
        "ctime": iso(alias.created_at),
        "mtime": iso(alias.updated_at),
        "datum": datum_json(datum, alias.name),
    }


def resolve_alias(session: Session, name: str) -> Datum:
    """The datum `datum://<name>` points at now; NotFound if no alias has that name."""
    row = session.scalar(
        select(Datum).join(DatumAlias, DatumAlias.datum_id == Datum.id).where(DatumAlias.name == name)
    )
    if row is None:
        raise NotFound(f"datum://{name[:300]}")
    return row


def alias_history(session: Session, name: str) -> list[dict[str, Any]]:
    """Where an alias pointed, oldest first: `{old, new, source, changed_at}` with datum uids."""
    alias = session.scalar(select(DatumAlias).where(DatumAlias.name == name))
    if alias is None:
        raise NotFound(f"datum://{name[:300]}")
    rows = session.scalars(
        select(AliasChange)
        .where(AliasChange.alias_kind == "datum", AliasChange.alias_id == alias.id)
        .order_by(AliasChange.id)
    ).all()
    ids = {r.new_id for r in rows} | {r.old_id for r in rows if r.old_id is not None}
    uids = {r[0]: r[1] for r in session.execute(select(Datum.id, Datum.uid).where(Datum.id.in_(ids)))}
    return [
        {
            "old": uids.get(r.old_id) if r.old_id is not None else None,
            "new": uids.get(r.new_id),
            "source": r.source,
            "changed_at": iso(r.changed_at),
        }
        for r in rows
    ]


# -- writes ----------------------------------------------------------------------------------


def check_datum_write(metadata: Any) -> dict[str, Any]:
    """Validate a user's write of datum properties: other rules as for datasets, but
    `valohai.tags` (a list of strings) and `valohai.alias` (an alias name) may be set."""
    if not isinstance(metadata, dict):
        raise InvalidEntry("expected a JSON object of properties")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.startswith(RESERVED_PREFIX) or value is None:
            continue
        if key == TAGS_KEY:
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise InvalidEntry(f"{TAGS_KEY} must be a list of strings", key)
        elif key == ALIAS_KEY:
            problem = alias_problem(value)
            if problem:
                raise InvalidEntry(problem, key)
        else:
            raise ReservedKey(key)
    check_properties(metadata, allow_reserved=True)
    problem = limits.value_problem(metadata)
    if problem:
        raise InvalidEntry(problem)
    return metadata


@dataclass(frozen=True)
class DatumWrite:
    """What an API write of a datum needs to know of it before staging (`write_target`)."""

    datum_id: int
    target: Target  # its execution's target
    path: str
    applied_once: bool  # the execution target has a watermark row


def write_target(engine: Engine, ident: str | int) -> DatumWrite:
    """The datum an API write names (NotFound if none) and its execution target."""
    with Session(engine) as session:
        datum = get_datum(session, ident)
        target = Target.for_execution(datum.execution)
        applied_once = session.get(Watermark, target.key) is not None
        return DatumWrite(datum.id, target, datum.path, applied_once)


def write_directly(engine: Engine, *entries: Entry) -> None:
    """Apply API writes of datums in one transaction, under their targets' watermark locks
    (the executions' staging state left Redis: see `applying.write_datum_properties`)."""
    with writer(engine).begin() as conn:
        # An apply of the same target waits, and we for it (locked in key order: no deadlock).
        lock_watermarks(conn, sorted({e.target.key for e in entries}))
        applier = Applier(conn, datetime.now(UTC))
        for entry in entries:
            applier.apply(entry)
        applier.flush()


def current_datum_properties(engine: Engine, datum_id: int) -> dict[str, Any]:
    with Session(engine) as session:
        row = session.get(Datum, datum_id)
        return dict(row.properties or {}) if row is not None else {}
