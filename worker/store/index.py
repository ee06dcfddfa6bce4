"""The search index: flatten a property set into typed rows, and keep those rows current."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

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


def path_text(keys: tuple[str, ...] | list[str]) -> str:
    """The stored form of a key path: a JSON array of the keys."""
    return orjson.dumps(list(keys)).decode()


def flatten(properties: dict[str, Any]) -> list[IndexRow]:
    """Every path of a property set with its type; nested objects are walked, arrays are not."""
    rows: list[IndexRow] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((k,), v) for k, v in properties.items()]
    while stack:
        keys, value = stack.pop()
        rows.append(_row(path_text(keys), value))
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


def reindex(session: Session, owner_kind: str, owner_id: int, properties: dict[str, Any]) -> None:
    """Replace an owner's index rows with those of its current properties."""
    session.execute(
        delete(PropertyIndex).where(
            PropertyIndex.owner_kind == owner_kind, PropertyIndex.owner_id == owner_id
        )
    )
    rows = [
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
    if rows:
        session.execute(insert(PropertyIndex), rows)
