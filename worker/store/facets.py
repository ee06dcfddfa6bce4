"""Facets and keys: what values a set of datasets or versions holds, read from the search index.

Every count is of owners (a dataset or version has at most one index row per property path).
The set is the rows a list with the same `filter` (and names) would show; None means all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import case, func, literal, select, union_all
from sqlalchemy.orm import Session

from ..limits import path_text
from ..query import Key, key_text
from .models import Dataset, DatasetVersion, Datum, PropertyIndex
from .search import OwnerKind

TOP = 20  # values listed per string key (then "other")
BUCKETS = 10
MAX_KEYS = 10_000  # distinct keys `keys` reads at most
_TABLES: dict[str, Any] = {"dataset": Dataset, "version": DatasetVersion, "datum": Datum}


def facets(session: Session, kind: OwnerKind, owners: Any, keys: Sequence[Key]) -> dict[str, Any]:
    """Per key: how many owners of the set have it, by type; the top string and boolean values
    with counts (then `other` and `missing`); min, max and a histogram of the numbers.

    `owners` is a query of owner ids (the filtered set), or None for every owner of `kind`."""
    if owners is None:
        total = session.scalar(select(func.count()).select_from(_TABLES[kind])) or 0
    else:
        total = session.scalar(select(func.count()).select_from(owners.subquery())) or 0
    return {"count": total, "facets": [_facet(session, kind, owners, key, total) for key in keys]}


def facets_of_nothing(key: Key) -> dict[str, Any]:
    """A key's facet over the empty set."""
    return {"key": key_text(key), "present": 0, "missing": 0, "types": {}}


def _rows(kind: OwnerKind, owners: Any, key: Key) -> list[Any]:
    where = [PropertyIndex.owner_kind == kind, PropertyIndex.path == path_text(key.path)]
    if owners is not None:
        where.append(PropertyIndex.owner_id.in_(owners.scalar_subquery()))
    return where


def _facet(session: Session, kind: OwnerKind, owners: Any, key: Key, total: int) -> dict[str, Any]:
    """One key's facet, in one pass over the index entries of each type the key holds.

    At 1M owners a pass over a key's entries is ~130 ms here, and reading `vtype` from the table
    ~450 ms, so each type is counted from an index that holds it alone: numbers from the `num`
    index (their count is the histogram's sum), strings from the `str_key` index (their total in
    the same pass as the top 20), the rest (booleans, objects, arrays, nulls) from the partial
    index of rows that are neither (migration 0013). Whether a type is there at all is read off
    an index's end first (the minimum and maximum of `num`, one entry of the others), so a key
    of one type costs one pass.
    """
    where = _rows(kind, owners, key)
    types: dict[str, int] = {}
    found: dict[str, Any] = {}
    low, high = session.execute(
        select(func.min(PropertyIndex.num), func.max(PropertyIndex.num)).where(
            *where, PropertyIndex.num.is_not(None)
        )
    ).one()
    if low is not None and high is not None:
        found["numbers"] = _numbers(session, where, low, high, filtered=owners is not None)
        types["number"] = found["numbers"]["count"]
    if _any(session, PropertyIndex.str_key, *where, PropertyIndex.str_key.is_not(None)):
        # Values longer than 200 characters are grouped by their first 200.
        top = session.execute(
            select(PropertyIndex.str_key, func.count().label("n"), func.sum(func.count()).over().label("all"))
            .where(*where, PropertyIndex.str_key.is_not(None))
            .group_by(PropertyIndex.str_key)
            .order_by(func.count().desc(), PropertyIndex.str_key)
            .limit(TOP)
        ).all()
        types["string"] = strings = int(top[0].all)
        shown = sum(r.n for r in top)
        found["strings"] = {
            "values": [{"value": r.str_key, "count": r.n} for r in top],
            "other": strings - shown,
        }
    other = [*where, PropertyIndex.num.is_(None), PropertyIndex.str_key.is_(None)]  # the partial index's rows
    if _any(session, PropertyIndex.vtype, *other):
        booleans: dict[bool, int] = {}
        rest = session.execute(
            select(PropertyIndex.vtype, PropertyIndex.bool_value, func.count())
            .where(*other)
            .group_by(PropertyIndex.vtype, PropertyIndex.bool_value)
        ).all()
        for vtype, value, n in rest:
            types[vtype] = types.get(vtype, 0) + n
            if vtype == "boolean":
                booleans[bool(value)] = booleans.get(bool(value), 0) + n
        if booleans:
            pairs = sorted(booleans.items(), key=lambda p: (-p[1], p[0]))
            found["booleans"] = {"values": [{"value": v, "count": n} for v, n in pairs], "other": 0}
    present = sum(types.values())
    out: dict[str, Any] = {
        "key": key_text(key),
        "present": present,
        "missing": total - present,
        "types": types,
    }
    for part in ("strings", "booleans", "numbers"):
        if part in found:
            out[part] = found[part]
    return out


def _any(session: Session, column: Any, *where: Any) -> bool:
    """Whether any index entry matches (one entry read, from the index that holds `column`)."""
    return session.execute(select(column).where(*where).limit(1)).first() is not None


def _numbers(
    session: Session, where: list[Any], low: float, high: float, *, filtered: bool
) -> dict[str, Any]:
    """The key's numbers between `low` and `high` (their minimum and maximum): how many, and a
    10-bucket histogram, in one pass."""
    numbers = [*where, PropertyIndex.num.is_not(None)]
    if low == high:
        count = session.scalar(select(func.count()).where(*numbers)) or 0
        return {
            "count": count,
            "min": low,
            "max": high,
            "histogram": [{"low": low, "high": high, "count": count}],
        }
    width = (high - low) / BUCKETS
    edges = [low + i * width for i in range(1, BUCKETS)]
    # Bucket i holds [its low, its high), as the answer states them; the maximum goes in the last.
    # Over every owner, one range count per bucket (UNION ALL: one statement, each branch a range
    # of the `num` index, together one pass over the key's numbers, without computing a bucket
    # per row and hashing it, which took twice as long at 1M). Over a filtered set each branch
    # would evaluate the set again: there the bucket is computed per row, in one pass.
    bounds = [None, *edges], [*edges, None]
    if filtered:
        value = PropertyIndex.num
        bucket = case(*((value < e, i) for i, e in enumerate(edges)), else_=BUCKETS - 1).label("bucket")
        counts = dict(session.execute(select(bucket, func.count()).where(*numbers).group_by(bucket)).all())
    else:
        branches = [
            select(literal(i).label("bucket"), func.count().label("n")).where(
                *numbers,
                *([] if start is None else [PropertyIndex.num >= start]),
                *([] if end is None else [PropertyIndex.num < end]),
            )
            for i, (start, end) in enumerate(zip(*bounds, strict=True))
        ]
        counts = dict(session.execute(union_all(*branches)).all())
    histogram = [
        {
            "low": start if start is not None else low,
            "high": end if end is not None else high,
            "count": counts.get(i, 0),
        }
        for i, (start, end) in enumerate(zip(*bounds, strict=True))
    ]
    return {"count": sum(counts.values()), "min": low, "max": high, "histogram": histogram}


def key_counts(session: Session, kind: OwnerKind, owners: Any, prefix: str = "") -> list[dict[str, Any]]:
    """The distinct property keys (nested ones as `a.b`) of the set, with how many owners have
    each and by which type, in key order. `prefix` matches the start of the key as written with
    dots (`camera.` lists the keys inside `camera`)."""
    where = [PropertyIndex.owner_kind == kind]
    if owners is not None:
        where.append(PropertyIndex.owner_id.in_(owners.scalar_subquery()))
    if prefix:
        start = path_text(prefix.split("."))[:-2]  # the JSON array text without its closing `"]`
        escaped = start.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(PropertyIndex.path.like(escaped + "%", escape="\\"))
    rows = session.execute(
        select(PropertyIndex.path, PropertyIndex.vtype, func.count())
        .where(*where)
        .group_by(PropertyIndex.path, PropertyIndex.vtype)
        .order_by(PropertyIndex.path)
        .limit(MAX_KEYS * 5)
    ).all()
    found: dict[str, dict[str, Any]] = {}
    for path, vtype, n in rows:
        entry = found.get(path)
        if entry is None:
            parts = orjson.loads(path)
            try:
                text = key_text(Key(tuple(parts)))
            except ValueError:  # a segment with a backtick cannot be written in the language
                continue
            entry = found[path] = {"key": text, "path": parts, "count": 0, "types": {}}
        entry["types"][vtype] = n
        entry["count"] += n
    return sorted(found.values(), key=lambda e: e["key"])[:MAX_KEYS]
