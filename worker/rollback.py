"""Pure core of `sidecar rollback`: one key's history since a maker first changed it → a
revert, a conflict, or nothing to do.

A maker is what `property_changes.made_by` names: an execution (its sidecar lines) or a
rollback. No database here; `store/rollback.py` reads the rows, `applying.py` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .merge import same_json


@dataclass(frozen=True)
class Change:
    """One history row of a key, as the rollback reads it (oldest first)."""

    made_by: str | None
    old: Any  # None: the key was absent
    new: Any  # None: the change deleted the key
    source: dict[str, Any]


@dataclass(frozen=True)
class Revert:
    """Put `key` back: from `old` (its value now) to `new` (its value before the maker's
    changes; None deletes it)."""

    key: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Conflict:
    """`key` was changed later by another source: left as it is (`value`, its value now)."""

    key: str
    value: Any
    reason: str


def judge(key: str, rows: list[Change], maker: str, current: Any) -> Revert | Conflict | None:
    """What rolling back `maker` does to `key`, given its history rows from the maker's first
    change of it on (oldest first) and its value now (None: absent).

    The key's last change made by another source wins: a conflict, left as it is. Otherwise
    the maker's last changes (the run of them at the end of the history) are undone: the key
    goes back to the value before the first of that run. Changes of the maker that another
    source overwrote before that run are already gone from the value and undo nothing.
    """
    if not rows:
        return None
    last = rows[-1]
    if last.made_by != maker:
        return Conflict(key, current, f"changed later by {describe(last.source)}")
    first = len(rows) - 1
    while first > 0 and rows[first - 1].made_by == maker:
        first -= 1
    restored = rows[first].old
    if same_json(current, restored):
        return None  # the maker's changes ended where they started
    return Revert(key, current, restored)


def describe(source: dict[str, Any]) -> str:
    """A history row's source in words, for a conflict's reason."""
    origin = source.get("origin")
    if origin == "sidecar":
        return f"execution {source.get('execution')} ({source.get('file')}:{source.get('line')})"
    if origin == "rollback":
        return f"rollback {source.get('id')} (of {source.get('execution')})"
    if origin == "bulk":
        return f"bulk edit {source.get('id')} ({source.get('filter')})"
    return str(origin) if origin == "platform" else "an API write"
