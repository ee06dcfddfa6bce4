"""Pure core: fold a change set into a property set (shallow; null deletes) and say what changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        elif old is _MISSING or not _same(old, value):
            properties[key] = value
            changed.append(Change(key, None if old is _MISSING else old, value))
    return changed


def _same(a: Any, b: Any) -> bool:
    # `1 == True` and `1 == 1.0` in Python, but they are different JSON values to a user.
    return type(a) is type(b) and bool(a == b)
