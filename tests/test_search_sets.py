"""Search as sets of owner ids: the SQL answer (count and page) equals the plain-Python evaluator.

`list_datasets` / `list_versions` first try `OwnerSets` (a selective part of the filter, or the
rows the names leave, gives at most `CAP` candidates) and fall back to the correlated-EXISTS SQL
of `Compiler.condition`. Random stores, filters, caps (so both paths and their mixtures run),
name/dataset restrictions, orderings and pages, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert
from sqlalchemy.orm import Session

from worker.query import And, Compare, Exists, In, Key, Like, Node, Not, Or, keys_of, matches, parse, render
from worker.store import search
from worker.store.index import reindex
from worker.store.models import Dataset, DatasetVersion, PropertyIndex
from worker.store.queries import ListQuery, list_datasets, list_versions
from worker.store.search import Compiler, OwnerSets

KEYS = [("n",), ("s",), ("b",), ("o", "x"), ("o",), ("k.dot",), ("missing",)]
NUMBERS = [-1, 0, 0.5, 2, 3]
STRINGS = ["", "a", "A", "ab", "a_b", "a%", "é", "night"]
SCALARS: list[Any] = [*NUMBERS, *STRINGS, True, False, None]

scalars = st.sampled_from(SCALARS)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.sampled_from(["x", "y"]), scalars, max_size=2),
)
property_sets = st.dictionaries(st.sampled_from(["n", "s", "b", "o", "k.dot"]), values, max_size=5)

keys = st.sampled_from(KEYS).map(Key)
literals = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(STRINGS), st.booleans())
atoms = st.one_of(
    st.builds(lambda k, v: Compare(k, "=", v), keys, literals),
    st.builds(
        Compare,
        keys,
        st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
        st.one_of(st.sampled_from(NUMBERS), st.sampled_from(STRINGS)),
    ),
    st.builds(lambda k, vs: In(k, tuple(vs)), keys, st.lists(literals, min_size=1, max_size=3)),
    st.builds(Like, keys, st.sampled_from(["%", "a%", "_", "%b", "a\\%", "A%"]), st.booleans()),
    st.builds(Exists, keys),
)
filters = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.builds(lambda xs: And(tuple(xs)), st.lists(inner, min_size=2, max_size=3)),
        st.builds(lambda xs: Or(tuple(xs)), st.lists(inner, min_size=2, max_size=3)),
        st.builds(Not, inner),
    ),
    max_leaves=6,
)
caps = st.sampled_from([0, 1, 2, 5, 10_000])
orderings = st.one_of(
    st.none(), st.builds(lambda k, d: ("-" if d else "") + render(Exists(k))[7:], keys, st.booleans())
)


def fill(engine: Engine, datasets: list[dict[str, Any]], versions: list[tuple[int, dict[str, Any]]]) -> None:
    """Replace the store's contents: datasets d0.. and versions v0.. (of dataset d<i>)."""
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for model in (PropertyIndex, DatasetVersion, Dataset):
            session.execute(delete(model))
        # Core inserts naming their columns: the rows fit an older schema too (test_migrations
        # fills a store at revision 0006, before the `last_used` column).
        ids = []
        for i, props in enumerate(datasets):
            values = {"name": f"d{i}", "properties": props, "created_at": now, "updated_at": now}
            ids.append(session.execute(insert(Dataset).values(values).returning(Dataset.id)).scalar_one())
        for dataset_id, props in zip(ids, datasets, strict=True):
            reindex(session.connection(), "dataset", dataset_id, props)
        for owner, name, props in version_names(versions):
            values = {
                "dataset_id": ids[owner],
                "name": name,
                "status": "completed",
                "properties": props,
                "created_at": now,
                "updated_at": now,
            }
            version_id = session.execute(
                insert(DatasetVersion).values(values).returning(DatasetVersion.id)
            ).scalar_one()
            reindex(session.connection(), "version", version_id, props)


def version_names(versions: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, str, dict[str, Any]]]:
    """(dataset, name, properties): the k-th version of a dataset is named x<k>, so names repeat
    across datasets."""
    seen: dict[int, int] = {}
    out = []
    for owner, props in versions:
        seen[owner] = seen.get(owner, -1) + 1
        out.append((owner, f"x{seen[owner]}", props))
    return out


def ordered(items: list[tuple[int, str, dict[str, Any]]], ordering: str | None) -> list[str]:
    """The reference ordering: by id; or by a key, typed (numbers, strings, booleans, other values),
    the targets without the key last, ties by id."""
    items = sorted(items, key=lambda item: item[0])
    if ordering is None:
        return [name for _, name, _ in items]
    descending = ordering.startswith("-")
    (key,) = keys_of(parse("exists " + ordering.lstrip("-")))
    groups: dict[int, list[tuple[Any, str]]] = {}
    for _, name, props in items:
        value: Any = props
        for segment in key.path:
            value = value.get(segment, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            rank, value = 9, 0
        elif isinstance(value, bool):
            rank = 2
        elif isinstance(value, int | float):
            rank = 0
        elif isinstance(value, str):
            rank = 1
        else:
            rank, value = 3, 0
        groups.setdefault(rank, []).append((value, name))
    out: list[str] = []
    for rank in sorted(groups):
        # Python's sort is stable, reverse=True included: ties keep the id order.
        out.extend(name for _, name in sorted(groups[rank], key=lambda g: g[0], reverse=descending))
    return out


_MISSING = object()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    datasets=st.lists(property_sets, min_size=1, max_size=3),
    versions=st.lists(st.tuples(st.integers(0, 2), property_sets), max_size=14),
    node=filters,
    cap=caps,
    ordering=orderings,
    restrict=st.sampled_from([None, "dataset", "name"]),
    page=st.tuples(st.integers(1, 6), st.integers(0, 4)),
)
def test_sql_equals_python(
    engine: Engine,
    datasets: list[dict[str, Any]],
    versions: list[tuple[int, dict[str, Any]]],
    node: Node,
    cap: int,
    ordering: str | None,
    restrict: str | None,
    page: tuple[int, int],
) -> None:
    versions = [(owner % len(datasets), props) for owner, props in versions]
    fill(engine, datasets, versions)
    limit, offset = page
    text = render(node)

    # Versions, optionally of one dataset or of one name.
    kw: dict[str, Any] = {"dataset": "d0"} if restrict == "dataset" else {"name": "x1"} if restrict else {}
    expected = [
        (j, f"d{owner}/{name}", props)
        for j, (owner, name, props) in enumerate(version_names(versions))
        if matches(node, props)
        and kw.get("dataset", f"d{owner}") == f"d{owner}"
        and kw.get("name", name) == name
    ]
    want = ordered(expected, ordering)
    with mock.patch.object(search, "CAP", cap), Session(engine) as session:
        count, found = list_versions(
            session, ListQuery(filter=text, ordering=ordering, limit=limit, offset=offset, **kw)
        )
        got = [f"{r.dataset.name}/{r.name}" for r in found]
    assert count == len(want)
    assert got == want[offset : offset + limit]

    # Datasets, optionally of one name.
    name = "d1" if restrict else None
    expected = [
        (i, f"d{i}", props)
        for i, props in enumerate(datasets)
        if matches(node, props) and (name is None or f"d{i}" == name)
    ]
    want = ordered(expected, ordering)
    with mock.patch.object(search, "CAP", cap), Session(engine) as session:
        count, rows = list_datasets(
            session, ListQuery(filter=text, name=name, ordering=ordering, limit=limit, offset=offset)
        )
        got = [r.name for r in rows]
    assert count == len(want)
    assert got == want[offset : offset + limit]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(datasets=st.lists(property_sets, min_size=1, max_size=12), node=filters, cap=caps)
def test_owner_sets_are_exact_or_give_up(
    engine: Engine, datasets: list[dict[str, Any]], node: Node, cap: int
) -> None:
    """`OwnerSets.matching` is exactly the matching owners, or None when nothing in the filter is
    selective; with candidates given it never gives up."""
    fill(engine, datasets, [])
    with Session(engine) as session:
        ids = {d.name: d.id for d in session.query(Dataset)}
        want = {ids[f"d{i}"] for i, props in enumerate(datasets) if matches(node, props)}
        compiler = Compiler("dataset", cast(Any, Dataset.id), session.get_bind().dialect.name)
        got = OwnerSets(session, compiler, cap).matching(node)
        assert got is None or got == want
        if cap >= len(datasets) and not _has_negation(node):
            assert got is not None  # every atom is within the cap, so the whole is
        some = set(list(ids.values())[::2])
        assert OwnerSets(session, compiler, cap).matching(node, some) == want & some


def _has_negation(node: Node) -> bool:
    match node:
        case Not():
            return True
        case And(items) | Or(items):
            return any(_has_negation(i) for i in items)
    return False


@pytest.mark.parametrize(
    ("text", "selective"),
    [
        ("n = 1", True),
        ('n = 1 and s = "a"', True),
        ('n = 3 and not s = "a"', True),  # a positive atom bounds the and
        ('n = 1 or s = "a"', True),
        ("not n = 1", False),
        ('n = 1 or not s = "a"', False),
        ("n > 0 and exists s", False),  # 15 and 20 of 20: neither within the cap of 10
    ],
)
def test_which_filters_are_evaluated_as_sets(engine: Engine, text: str, selective: bool) -> None:
    fill(engine, [{"n": i % 4, "s": "b" if i % 5 else "a"} for i in range(20)], [])
    with Session(engine) as session:
        compiler = Compiler("dataset", cast(Any, Dataset.id), session.get_bind().dialect.name)
        got = OwnerSets(session, compiler, 10).matching(parse(text))
        assert (got is not None) == selective
