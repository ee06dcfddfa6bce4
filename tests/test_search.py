"""Search: the SQL compilation of filters equals the plain-Python evaluator, on both databases."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from worker.query import And, Compare, Exists, FilterError, In, Key, Like, Node, Not, Or, matches, render
from worker.store.index import reindex
from worker.store.models import Dataset, DatasetVersion
from worker.store.queries import ListQuery, list_datasets, list_versions

KEYS = [("n",), ("s",), ("flag",), ("nested", "x"), ("nested",), ("k.dot",), ("arr",), ("missing",)]
NUMBERS = [-1, 0, 0.5, 2, 4000, 4700, 10**6]
STRINGS = [
    "",
    "4700",
    "night",
    "Night",
    "NIGHT",
    "stainless-steel-304",
    "a%b",
    "a_b",
    "x\\y",
    "é",
    "Ž",
    "[*?]",
]
# Around the indexed prefix (`str_key`, 200 characters): a shorter value is compared with
# `str_key` alone, a longer one with the whole string. In the search corpus only (a facet
# lists a string by its `str_key`).
LONG_STRINGS = ["p" * 199, "p" * 198 + "q", "p" * 199 + "a", "p" * 200, "p" * 201, "p" * 200 + "a"]


def corpus(seed: int = 7, size: int = 60, strings: list[str] = STRINGS) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    values: list[Any] = [*NUMBERS, *strings, True, False, [1, "a"], {"x": 1}, {"x": "night"}, {}]
    out = []
    for _ in range(size):
        props: dict[str, Any] = {}
        for key in ("n", "s", "flag", "nested", "k.dot", "arr"):
            if rng.random() < 0.7:
                props[key] = rng.choice(values)
        out.append(props)
    return out


def populate(engine: Engine, property_sets: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        dataset = Dataset(name="d", properties={}, created_at=now, updated_at=now)
        session.add(dataset)
        session.flush()
        for i, props in enumerate(property_sets):
            ds = Dataset(name=f"d{i}", properties=props, created_at=now, updated_at=now)
            v = DatasetVersion(
                dataset_id=dataset.id,
                name=f"v{i}",
                status="completed",
                properties=props,
                created_at=now,
                updated_at=now,
            )
            session.add_all([ds, v])
            session.flush()
            reindex(session.connection(), "dataset", ds.id, props)
            reindex(session.connection(), "version", v.id, props)


def search_versions(engine: Engine, text: str, **kw: Any) -> list[str]:
    with Session(engine) as session:
        _, rows = list_versions(session, ListQuery(filter=text, limit=1000, **kw))
        return [r.name for r in rows]


def expected_versions(property_sets: list[dict[str, Any]], node: Node) -> list[str]:
    return [f"v{i}" for i, props in enumerate(property_sets) if matches(node, props)]


# -- examples from the reference -------------------------------------------------------------------

REFERENCE = [
    {
        "domain": "manufacturing",
        "machine": "press-04",
        "material": "stainless-steel-304",
        "sample_count": 4700,
        "defect_rate": 0.002,
        "shift": "night",
        "capture_date": "2026-01-15",
        "valohai.last-used": "2026-05-01T00:00:00+00:00",
    },
    {
        "domain": "manufacturing",
        "machine": "press-05",
        "material": "aluminium",
        "sample_count": "4700",
        "defect_rate": 0.02,
        "shift": "day",
        "camera": {"model": "x100", "fps": 30},
    },
    {"domain": "medical", "sample_count": 120, "reviewed": True},
]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('domain = "manufacturing"', ["v0", "v1"]),
        ("sample_count > 4000", ["v0"]),  # the string "4700" never compares with a number
        ('sample_count = "4700"', ["v1"]),
        ('machine = "press-04" and defect_rate < 0.01', ["v0"]),
        ('shift in ("night", "evening")', ["v0"]),
        ('material like "stainless%"', ["v0"]),
        ('material like "STAINLESS%"', []),
        ('material ilike "STAINLESS%"', ["v0"]),
        ("camera.fps >= 30", ["v1"]),
        ("exists camera", ["v1"]),
        ("not exists camera", ["v0", "v2"]),
        ('`valohai.last-used` < "2026-06-01"', ["v0"]),
        ("reviewed = true", ["v2"]),
        ("reviewed != true", []),
        ('not (shift = "night")', ["v1", "v2"]),
        ('shift != "night"', ["v1"]),
        ('(domain = "medical" or shift = "day") and not exists reviewed', ["v1"]),
    ],
)
def test_reference_examples(engine: Engine, text: str, names: list[str]) -> None:
    populate(engine, REFERENCE)
    assert search_versions(engine, text) == names
    with Session(engine) as session:
        _, rows = list_datasets(session, ListQuery(filter=text, limit=100))
        assert [r.name for r in rows if r.name != "d"] == [n.replace("v", "d") for n in names]


def test_ordering_is_typed_and_missing_keys_come_last(engine: Engine) -> None:
    populate(engine, [{"n": 3}, {"n": "b"}, {}, {"n": -1}, {"n": "a"}, {"n": True}, {"n": 10}])
    with Session(engine) as session:
        _, rows = list_versions(session, ListQuery(ordering="n"))
        assert [r.name for r in rows] == ["v3", "v0", "v6", "v4", "v1", "v5", "v2"]
        _, rows = list_versions(session, ListQuery(ordering="-n"))
        assert [r.name for r in rows] == ["v6", "v0", "v3", "v1", "v4", "v5", "v2"]


def test_bad_filters_say_where(engine: Engine) -> None:
    with pytest.raises(FilterError) as info:
        search_versions(engine, "sample_count >")
    assert info.value.position == 14 and info.value.expected == "a literal"
    with pytest.raises(FilterError):
        search_versions(engine, "a = 1", ordering="-")


# -- the property test: SQL equals Python --------------------------------------------------------

keys = st.sampled_from(KEYS).map(Key)
literals = st.one_of(st.sampled_from(NUMBERS), st.sampled_from([*STRINGS, *LONG_STRINGS]), st.booleans())
atoms = st.one_of(
    st.builds(lambda k, v: Compare(k, "=", v), keys, literals),
    st.builds(
        Compare,
        keys,
        st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
        st.one_of(st.sampled_from(NUMBERS), st.sampled_from([*STRINGS, *LONG_STRINGS])),
    ),
    st.builds(lambda k, vs: In(k, tuple(vs)), keys, st.lists(literals, min_size=1, max_size=3)),
    st.builds(
        Like,
        keys,
        st.sampled_from(
            ["%", "n%", "%ght", "_ight", "a%b", "a\\%", "x\\y", "%É%", "[*?]", "%-%"]
            # A literal prefix and `%` is a range of str_key alone, up to its length.
            + [
                "4%",
                "4%1",
                "n%x",
                "[*%",
                "4_%",
                "p" * 199 + "%",
                "p" * 200 + "%",
                "p" * 201 + "%",
                "p" * 198 + "_%",
            ]
        ),
        st.booleans(),
    ),
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


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(node=filters)
def test_sql_equals_the_python_evaluator(engine: Engine, node: Node) -> None:
    property_sets = _populated(engine)
    assert search_versions(engine, render(node)) == expected_versions(property_sets, node)


def _populated(engine: Engine) -> list[dict[str, Any]]:
    # Hypothesis runs many examples against one database: fill it on the first only.
    property_sets = corpus(size=80, strings=[*STRINGS, *LONG_STRINGS])
    if not getattr(engine, "_search_corpus", False):
        populate(engine, property_sets)
        engine._search_corpus = True  # type: ignore[attr-defined]
    return property_sets
