"""Facets and keys equal a plain-Python count over the same data: for any filter of the search
language, on datasets, versions and datums, on both databases (a hypothesis property test).

The expectation is computed here from the property sets themselves (walk the nested objects,
count JSON types and values, bucket the numbers), not from the index the store reads."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.test_datums_search import populate_datums
from tests.test_search import corpus, filters, populate
from worker.query import Key, Node, key_text, matches, render
from worker.store import facets
from worker.store.datums import DatumQuery
from worker.store.queries import ListQuery
from worker.store.sets import owner_ids

PATHS = [("n",), ("s",), ("flag",), ("nested",), ("nested", "x"), ("k.dot",), ("arr",), ("missing",)]
PREFIXES = ["", "n", "nested.", "nested.x", "k", "k.", "a", "zz"]


def _populated(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """The property sets of each kind, in id order (filled on hypothesis's first example only)."""
    versions, datums = corpus(seed=7), corpus(seed=11)
    if not getattr(engine, "_facet_corpus", False):
        populate(engine, versions)
        populate_datums(engine, datums)
        engine._facet_corpus = True  # type: ignore[attr-defined]
    # populate() adds the versions' dataset "d" (no properties) before the dataset of each set.
    return {"dataset": [{}, *versions], "version": versions, "datum": datums}


def _ask(kind: str, node: Node) -> ListQuery | DatumQuery:
    return DatumQuery(filter=render(node)) if kind == "datum" else ListQuery(filter=render(node))


def _walk(properties: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Every path of a property set (nested objects walked, arrays not) → its value."""
    out: dict[tuple[str, ...], Any] = {}

    def visit(prefix: tuple[str, ...], value: Any) -> None:
        out[prefix] = value
        if isinstance(value, dict):
            for k, v in value.items():
                visit((*prefix, k), v)

    for key, value in properties.items():
        visit((key,), value)
    return out


def _jtype(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else "null"


def expected_facet(sets: list[dict[str, Any]], path: tuple[str, ...]) -> dict[str, Any]:
    values = [w[path] for w in map(_walk, sets) if path in w]
    types = Counter(_jtype(v) for v in values)
    out: dict[str, Any] = {
        "key": key_text(Key(path)),
        "present": len(values),
        "missing": len(sets) - len(values),
        "types": dict(types),
    }
    strings = Counter(v for v in values if isinstance(v, str))
    if strings:  # fewer than facets.TOP distinct strings in the corpus: all of them are listed
        assert len(strings) <= facets.TOP
        out["strings"] = {"values": dict(strings), "other": 0}
    booleans = Counter(v for v in values if isinstance(v, bool))
    if booleans:
        out["booleans"] = dict(booleans)
    numbers = [float(v) for v in values if _jtype(v) == "number"]
    if numbers:
        low, high = min(numbers), max(numbers)
        # Bucket i is [low + i * width, low + (i + 1) * width), as the answer states its bounds;
        # the maximum is in the last.
        width = (high - low) / facets.BUCKETS
        edges = [low + i * width for i in range(1, facets.BUCKETS)]
        counts = Counter(sum(x >= e for e in edges) for x in numbers)
        buckets = [counts.get(i, 0) for i in range(facets.BUCKETS)] if low != high else [len(numbers)]
        out["numbers"] = {"count": len(numbers), "min": low, "max": high, "buckets": buckets}
    return out


def comparable(facet: dict[str, Any]) -> dict[str, Any]:
    """The store's facet in the expectation's shape; the order of the listed strings is
    checked here (most frequent first; ties in the database's collation, so not compared)."""
    out = {k: facet[k] for k in ("key", "present", "missing", "types")}
    if "strings" in facet:
        listed = facet["strings"]["values"]
        counts = [v["count"] for v in listed]
        assert counts == sorted(counts, reverse=True)
        out["strings"] = {
            "values": {v["value"]: v["count"] for v in listed},
            "other": facet["strings"]["other"],
        }
    if "booleans" in facet:
        assert facet["booleans"]["other"] == 0
        out["booleans"] = {v["value"]: v["count"] for v in facet["booleans"]["values"]}
    if "numbers" in facet:
        numbers = facet["numbers"]
        out["numbers"] = {
            "count": numbers["count"],
            "min": numbers["min"],
            "max": numbers["max"],
            "buckets": [b["count"] for b in numbers["histogram"]],
        }
    return out


def expected_keys(sets: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    wanted = prefix.split(".") if prefix else []
    found: dict[tuple[str, ...], Counter[str]] = {}
    for walked in map(_walk, sets):
        for path, value in walked.items():
            found.setdefault(path, Counter())[_jtype(value)] += 1

    def under(path: tuple[str, ...]) -> bool:
        if not wanted:
            return True
        head, last = wanted[:-1], wanted[-1]
        return (
            len(path) >= len(wanted) and list(path[: len(head)]) == head and path[len(head)].startswith(last)
        )

    rows = [
        {"key": key_text(Key(p)), "path": list(p), "count": sum(t.values()), "types": dict(t)}
        for p, t in found.items()
        if under(p)
    ]
    return sorted(rows, key=lambda r: r["key"])


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    node=filters,
    kind=st.sampled_from(["dataset", "version", "datum"]),
    prefix=st.sampled_from(PREFIXES),
)
def test_facets_and_keys_equal_a_plain_count(engine: Engine, node: Node, kind: str, prefix: str) -> None:
    sets = [props for props in _populated(engine)[kind] if matches(node, props)]
    with Session(engine) as session:
        ids = owner_ids(session, kind, _ask(kind, node))  # type: ignore[arg-type]
        if ids is False:
            assert sets == []
            return
        answer = facets.facets(session, kind, ids, [Key(p) for p in PATHS])  # type: ignore[arg-type]
        keys = facets.key_counts(session, kind, ids, prefix)  # type: ignore[arg-type]
    assert answer["count"] == len(sets)
    assert [comparable(f) for f in answer["facets"]] == [expected_facet(sets, p) for p in PATHS]
    assert keys == expected_keys(sets, prefix)


@pytest.mark.parametrize("kind", ["dataset", "version", "datum"])
def test_facets_and_keys_of_every_owner_equal_a_plain_count(engine: Engine, kind: str) -> None:
    """No filter: the set is every owner of the kind (`owners` None), which reads the indexes
    over whole ranges (the histogram's per-bucket range counts) instead of per row."""
    everything = _populated(engine)[kind]
    with Session(engine) as session:
        answer = facets.facets(session, kind, None, [Key(p) for p in PATHS])  # type: ignore[arg-type]
        keys = facets.key_counts(session, kind, None, "")  # type: ignore[arg-type]
    assert answer["count"] == len(everything)
    assert [comparable(f) for f in answer["facets"]] == [expected_facet(everything, p) for p in PATHS]
    assert keys == expected_keys(everything, "")
