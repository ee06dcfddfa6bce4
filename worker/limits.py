"""What the store can hold, checked before the store is asked to (pure; no IO).

Every limit here is one that SQLite ignores and PostgreSQL enforces, or one that neither can
hold at all. A value past one of them used to fail the apply with a `DataError` on every retry
(PostgreSQL only), wedging its target. So each limit is checked once, in the same place for both
databases, and each has one of two outcomes:

* the line (or API write) is refused, naming the limit: names, top-level keys, datum paths,
  strings holding NUL (neither PostgreSQL's `text` nor `jsonb` can store U+0000), numbers beyond
  64 bits or not finite (JSON has no NaN; `jsonb` rejects them);
* the value is stored whole and only left out of the search index: nested key paths longer than
  the index's btree can hold (`index.flatten`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import orjson

# `datasets.name`, `dataset_versions.name` and `datums.execution` are VARCHAR(255).
NAME_MAX = 255
# Integer keys are 64-bit in both databases: a larger number names nothing (404), never a 500.
ID_MAX = 2**63 - 1
# `property_changes.key` is VARCHAR(256): every top-level key ends up there.
KEY_MAX = 256
# A btree entry holds at most 2,704 bytes on PostgreSQL. The datum index is (execution, path):
# an execution (a folder name, at most 255 bytes) and the path must fit together.
DATUM_PATH_MAX_BYTES = 2048
# The search index's btrees are (owner_kind, path, str_key) with str_key at most 200 characters
# (800 bytes of UTF-8): a path's JSON text is indexed only up to this many bytes. A top-level
# key (256 characters, at most 1,024 bytes, plus escapes) always fits.
INDEX_PATH_MAX_BYTES = 1536
# JSON integers the store keeps exactly: jsonb holds any, but the encoders (orjson) and SQLite's
# integers stop at 64 bits; orjson reads larger literals in a file as floats already.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1

_NUL_ESCAPE = b"\\u0000"
# A path text of at most this many characters fits whatever they are (4 bytes each at most).
_SHORT_PATH = INDEX_PATH_MAX_BYTES // 4


def path_text(keys: Sequence[str]) -> str:
    """The stored form of a key path in the search index: a JSON array of the keys."""
    return orjson.dumps(list(keys)).decode()


def fits_index(path: str) -> bool:
    """Whether a path's text (`path_text`) fits the search index's btrees."""
    return len(path) <= _SHORT_PATH or len(path.encode()) <= INDEX_PATH_MAX_BYTES


def value_problem(value: Any, where: str = "") -> str | None:
    """Why a JSON value (from an API body, parsed by the stdlib) cannot be stored, or None.

    Walks every key and value: strings with NUL or lone surrogates, integers beyond 64 bits,
    floats that are not finite. Depth is bounded by the caller's depth check.
    """
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        kind = type(item)
        if kind is dict:
            for key, child in item.items():
                problem = _string_problem(key)
                if problem:
                    return f"key {_shown(key)} under {path or 'the top level'} {problem}"
                stack.append((f"{path}.{key}" if path else key, child))
        elif kind is list:
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
        elif kind is str:
            problem = _string_problem(item)
            if problem:
                return f"the string at {path or 'the top level'} {problem}"
        elif kind is int and not INT_MIN <= item <= INT_MAX:
            return f"the integer at {path} is beyond 64 bits (limit {INT_MIN}..{INT_MAX})"
        elif kind is float and not math.isfinite(item):
            return f"the number at {path} is not finite ({item})"
    return None


def line_may_hold_nul(raw: bytes) -> bool:
    """A fast test on a line's bytes: False means no string in it holds U+0000.

    JSON text can only spell NUL as the escape `\\u0000` (a raw NUL byte is not JSON); orjson
    refuses lone surrogates and numbers beyond a double already. A True is checked exactly.
    """
    return _NUL_ESCAPE in raw


def datum_path_problem(path: str) -> str | None:
    """Why a datum's path cannot be stored, or None."""
    size = len(path.encode("utf-8", "surrogatepass"))
    if size > DATUM_PATH_MAX_BYTES:
        return f"file path is {size} bytes long, over the limit of {DATUM_PATH_MAX_BYTES} bytes"
    return None


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (U+0000), which the database cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate, which is not valid Unicode text"
    return None


def _shown(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "...")
