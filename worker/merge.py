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
    changed: list[Change] = []
    for key, value in changes.items():
        old = result.get(key, _MISSING)
        if value is None:
            if old is _MISSING:
                continue
            del result[key]
            changed.append(Change(key, old, None))
        elif old is _MISSING or not _same(old, value):
            result[key] = value
            changed.append(Change(key, None if old is _MISSING else old, value))
    return result, changed


def _same(a: Any, b: Any) -> bool:
    # `1 == True` and `1 == 1.0` in Python, but they are different JSON values to a user.
    return type(a) is type(b) and bool(a == b)
