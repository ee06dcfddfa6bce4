"""The search index: flatten a property set into typed rows, and keep those rows current."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import JSON, Connection, Table, delete, func, insert, or_

from ..limits import fits_index, path_text
from .db import json_text
from .models import PropertyIndex

STR_KEY_LENGTH = 200


@dataclass(frozen=True)
class IndexRow:
    """One typed property path (pure data; see PropertyIndex)."""

    path: str
    vtype: str
    num: float | None = None
    str_value: str | None = None
    bool_value: bool | None = None


def flatten(properties: dict[str, Any]) -> list[IndexRow]:
    """Every path of a property set with its type; nested objects are walked, arrays are not.

    A path whose text is longer than the index can hold (`limits.INDEX_PATH_MAX_BYTES`) is left
    out, and so is everything under it (longer still): the value stays stored whole in the
    owner's properties, it is only not searchable by that path.
    """
    rows: list[IndexRow] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((k,), v) for k, v in properties.items()]
    while stack:
        keys, value = stack.pop()
        path = path_text(keys)
        if not fits_index(path):
            continue
        rows.append(_row(path, value))
        if isinstance(value, dict):
            stack.extend(((*keys, k), v) for k, v in value.items())
    return rows


def _row(path: str, value: Any) -> IndexRow:
    if isinstance(value, bool):
        return IndexRow(path, "boolean", bool_value=value)
    if isinstance(value, int | float):
        return IndexRow(path, "number", num=float(value))
    if isinstance(value, str):
        return IndexRow(path, "string", str_value=value)
    if isinstance(value, dict):
        return IndexRow(path, "object")
    if isinstance(value, list):
        return IndexRow(path, "array")
    return IndexRow(path, "null")


def lower(text: str) -> str:
    """The one lowercasing `ilike` uses, in the index and in the plain-Python evaluator."""
    return text.lower()


# A partial re-index deletes with one condition per changed key; past this many keys, or when
# the changed keys are a good part of the set (a completion: every key is new), replacing every
# row of the owner is as cheap and one short statement.
PARTIAL_MAX_KEYS = 64

# The index row of `valohai.last-used`, which lives in its own column (store/last_used.py), not
# in the property set: a full re-index from the set must leave it.
LAST_USED_PATH = '["valohai.last-used"]'


def reindex(
    conn: Connection,
    owner_kind: str,
    owner_id: int,
    properties: dict[str, Any],
    keys: Collection[str] | None = None,
    *,
    had_rows: bool = True,
) -> None:
    """Bring an owner's index rows in line with its current `properties`.

    `keys`: the top-level keys that changed since the rows were last written (None: unknown,
    replace every row). The rows of one top-level key depend on that key's value only, so
    replacing the rows of the changed keys leaves the index equal to a full re-index.
    `had_rows=False`: the owner's stored set was empty, so it has no rows to delete (they are
    written only here, in the transaction that stores the set); a new version is the usual case.

    Runs through Core: an ORM bulk insert groups rows by which columns are NULL (typed rows
    alternate), turning the executemany into one INSERT per row.
    """
    table = cast(Table, PropertyIndex.__table__)
    owner = (table.c.owner_kind == owner_kind, table.c.owner_id == owner_id)
    if not had_rows:
        rows = index_rows(owner_kind, owner_id, properties)
    elif keys is not None and len(keys) <= PARTIAL_MAX_KEYS and 2 * len(keys) <= len(properties):
        if not keys:
            return
        terms = []
        for key in keys:
            top = path_text((key,))
            prefix = top[:-1] + ","  # '["key",' starts the path of every key nested under it
            terms.append(table.c.path == top)
            terms.append(func.substr(table.c.path, 1, len(prefix)) == prefix)
        conn.execute(delete(table).where(*owner, or_(*terms)))
        rows = index_rows(owner_kind, owner_id, {k: properties[k] for k in keys if k in properties})
    else:
        conn.execute(delete(table).where(*owner, table.c.path != LAST_USED_PATH))
        rows = index_rows(owner_kind, owner_id, properties)
    bulk_insert(conn, table, rows)


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) inside the connection's transaction.

    The rows are encoded here and handed to the driver's fastest bulk path: on PostgreSQL one
    `COPY ... FROM STDIN` (3–5× faster than psycopg's executemany, which runs the INSERT once
    per row); elsewhere the DBAPI's executemany, which skips SQLAlchemy's per-row parameter
    processing (a fifth of an apply's time on SQLite). Values are encoded the way SQLAlchemy
    would for an INSERT: the dialect's bind processors (SQLite's text datetimes), and JSON
    columns through `json_text`, with None as SQL NULL (`none_as_null`).
    """
    if not rows:
        return
    names = list(rows[0])
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(n) for n in names)
    name = dialect.identifier_preparer.format_table(table)
    if dialect.name == "postgresql":
        # psycopg adapts everything but JSON itself (datetimes, numbers, None).
        encoders = [_json_text if isinstance(table.c[n].type, JSON) else None for n in names]
        cursor = cast(Any, conn.connection.driver_connection).cursor()
        try:
            with cursor.copy(f"COPY {name} ({columns}) FROM STDIN") as copy:
                for values in _encoded(rows, names, encoders):
                    copy.write_row(values)
        finally:
            cursor.close()
        return
    if dialect.paramstyle != "qmark":  # pragma: no cover - only SQLite and PostgreSQL are supported
        conn.execute(insert(table), rows)
        return
    encoders = [
        _json_text if isinstance(c.type, JSON) else _bind_processor(c, dialect)
        for c in (table.c[n] for n in names)
    ]
    marks = ", ".join("?" for _ in names)
    conn.exec_driver_sql(f"INSERT INTO {name} ({columns}) VALUES ({marks})", _encoded(rows, names, encoders))


def _bind_processor(column: Any, dialect: Any) -> Any:
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def _encoded(rows: list[dict[str, Any]], names: list[str], encoders: list[Any]) -> list[tuple[Any, ...]]:
    """Each row's values in `names` order, through its column's encoder (None: as it is).

    Encoded a column at a time, and a value that is the same object as the one before it is
    encoded once: an apply's history rows share their time and, per entry, their source.
    """
    columns: list[list[Any]] = []
    for name, encode in zip(names, encoders, strict=True):
        column = [row[name] for row in rows]
        columns.append(column if encode is None else _encode_column(column, encode))
    return list(zip(*columns, strict=True))


def _encode_column(values: list[Any], encode: Any) -> list[Any]:
    out: list[Any] = []
    last: Any = out  # a sentinel no value is
    last_encoded: Any = None
    for value in values:
        if value is None:
            out.append(None)
        elif value is last:
            out.append(last_encoded)
        else:
            last, last_encoded = value, encode(value)
            out.append(last_encoded)
    return out


def _json_text(value: Any) -> str | None:
    return None if value is None else json_text(value)


def index_rows(owner_kind: str, owner_id: int, properties: dict[str, Any]) -> list[dict[str, Any]]:
    """The `property_index` rows of a property set, as Core insert parameters."""
    return [
        {
            "owner_kind": owner_kind,
            "owner_id": owner_id,
            "path": r.path,
            "vtype": r.vtype,
            "num": r.num,
            "str_key": None if r.str_value is None else r.str_value[:STR_KEY_LENGTH],
            "str_value": r.str_value,
            "str_lower": None if r.str_value is None else lower(r.str_value),
            "bool_value": r.bool_value,
        }
        for r in flatten(properties)
    ]
