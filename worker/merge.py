"""Pure core: fold a change set into a property set (shallow; null deletes) and say what changed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

_MISSING: Any = object()


@dataclass(frozen=True)
class Change:
    """One key's move from `old` to `new`; None on either side means absent."""

    key: str
    old: Any
    new: Any


def merge(current: dict[str, Any], changes: dict[str, Any]) -> tuple[dict[str, Any], list[Change]]:
    """Return the new property set and the keys that really changed, in `changes` order."""
    result = dict(current)
    return result, merge_into(result, changes)


def merge_into(properties: dict[str, Any], changes: dict[str, Any]) -> list[Change]:
    """`merge`, in place: for folding many entries into one set without copying it each time."""
    changed: list[Change] = []
    for key, value in changes.items():
        old = properties.get(key, _MISSING)
        if value is None:
            if old is _MISSING:
                continue
            del properties[key]
            changed.append(Change(key, old, None))
        elif old is _MISSING or not same_json(old, value):
            properties[key] = value
            changed.append(Change(key, None if old is _MISSING else old, value))
    return changed


def same_json(a: Any, b: Any) -> bool:
    """Whether two values are the same JSON value. Python's `==` says `1 == True == 1.0`, also
    inside lists and objects, but they are different JSON values to a user."""
    if type(a) is not type(b):
        return False
    if not isinstance(a, dict | list):
        return bool(a == b)
    return _canonical(a) == _canonical(b)


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer beyond 64 bits
        return json.dumps(value, sort_keys=True).encode()
