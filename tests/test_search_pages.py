"""Pages of a list past the count cap: `count_exact`, `count=exact`, `next` links (offset and
keyset cursor), and an ordering by a property read a type at a time. Small stores with the cap
patched down, on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from unittest import mock

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.test_search_sets import fill, filters, property_sets
from worker.api import create_app
from worker.query import And, Compare, Exists, Key, Like, Node, matches, parse, render
from worker.staging import Staging
from worker.store import queries, search
from worker.store.queries import ListQuery, list_version_ids

# 12 versions of one dataset: n = i % 3 (ties), s a string (one long), half with `even`.
PROPS: list[dict[str, Any]] = [
    {"n": i % 3, "s": f"v{i % 4}" if i != 5 else "x" * 250, **({"even": True} if i % 2 == 0 else {})}
    for i in range(12)
]


def _names(engine: Engine, ask: ListQuery) -> tuple[queries.Listed, list[str]]:
    with Session(engine) as session:
        listed = list_version_ids(session, ask)
        shown = queries.versions_page_json(session, listed.rows)
    return listed, [v["name"] for v in shown]


def test_a_count_past_the_cap_is_capped_unless_asked_exact(engine: Engine) -> None:
    fill(engine, [{}], [(0, p) for p in PROPS])
    with mock.patch.object(queries, "COUNT_CAP", 4):
        for text in (None, "exists n", "exists even", "n >= 0 and exists s", "n = 1 or exists even"):
            listed, _ = _names(engine, ListQuery(filter=text, limit=2, exact_count=False))
            assert (listed.count, listed.count_exact, listed.more) == (4, False, True), text
            exact, _ = _names(engine, ListQuery(filter=text, limit=2, exact_count=True))
            assert exact.count_exact and exact.count == (
                6 if text and "even" in text and "or" not in text else 8 if text and "or" in text else 12
            ), text
        # Under the cap the count is exact; and a short last page knows the count.
        listed, _ = _names(engine, ListQuery(filter="n = 1", limit=10, exact_count=False))
        assert (listed.count, listed.count_exact, listed.more) == (4, True, False)
        listed, names = _names(engine, ListQuery(filter="exists even", limit=4, offset=4, exact_count=False))
        assert (listed.count, listed.count_exact, listed.more, names) == (6, True, False, ["x8", "x10"])


def test_ordering_by_a_property_a_type_at_a_time(engine: Engine) -> None:
    props = [*PROPS, {"n": "text"}, {"n": [1]}, {"n": False}, {}]
    fill(engine, [{}], [(0, p) for p in props])
    by_n = [f"x{i}" for i in (0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11)] + ["x12", "x14", "x13", "x15"]
    down = [f"x{i}" for i in (2, 5, 8, 11, 1, 4, 7, 10, 0, 3, 6, 9)] + ["x12", "x14", "x13", "x15"]
    for ordering, want in (("n", by_n), ("-n", down)):
        for limit, offset in ((3, 0), (5, 2), (4, 11), (20, 0)):
            _, names = _names(engine, ListQuery(ordering=ordering, limit=limit, offset=offset))
            assert names == want[offset : offset + limit], (ordering, limit, offset)
    # Strings: the long one sorts by its full value after every shorter "v…" (x5 is "xxx…").
    _, names = _names(engine, ListQuery(ordering="s", filter="n = 0", limit=10))
    assert names == ["x0", "x9", "x6", "x3"]


def test_next_links_go_past_a_capped_count(engine: Engine, staging: Staging) -> None:
    fill(engine, [{}], [(0, p) for p in PROPS])
    with (
        mock.patch.object(queries, "COUNT_CAP", 3),
        TestClient(create_app(engine, staging, lambda k: None)) as c,
    ):
        seen: list[str] = []
        url: str | None = "/api/v0/dataset-versions/?limit=2&filter=exists%20n"
        while url is not None:
            page = c.get(url).json()
            assert page["count"] == 3 and page["count_exact"] is False or page["next"] is None
            seen += [v["name"] for v in page["results"]]
            url = page["next"]
            assert url is None or "cursor=i" in url
        assert seen == [f"x{i}" for i in range(12)]
        exact = c.get("/api/v0/dataset-versions/?count=exact&limit=2").json()
        assert (exact["count"], exact["count_exact"]) == (12, True)
        # A cursor starts after its row whatever the offset says; offset alone still pages.
        first = c.get("/api/v0/dataset-versions/?limit=2&offset=4").json()
        assert [v["name"] for v in first["results"]] == ["x4", "x5"]
        assert c.get("/api/v0/dataset-versions/?cursor=bad").status_code == 400


LONG = "p" * 200  # a str_key's length: strings sharing it are ordered by their full values
SHORT = st.sampled_from(["a", "b", "c", "ab"])
# Short strings mostly: a long one at the top hands the whole descending page to the sorting
# query, and the value-by-value reading is what needs testing.
S_VALUES = st.one_of(
    SHORT,
    SHORT,
    SHORT,
    SHORT,
    st.sampled_from([LONG, LONG + "a", LONG + "b", "p" * 250]),
    st.integers(-2, 2),
    st.booleans(),
    st.just([1]),
)
ROWS = st.lists(
    st.fixed_dictionaries({"n": st.integers(0, 2)}, optional={"s": S_VALUES}), min_size=1, max_size=30
)


def _reference(rows: list[dict[str, Any]], descending: bool, text: str | None) -> list[str]:
    """`search.order_by` in plain Python: numbers, strings, booleans, the rest, then the rows
    without the key; values in order (descending or not), ties by id ascending."""

    def rank(i: int) -> tuple[Any, ...]:
        value = rows[i].get("s", _MISSING)
        if value is _MISSING:
            return (9, 0, i)
        if isinstance(value, bool):
            return (2, -value if descending else value, i)
        if isinstance(value, int):
            return (0, -value if descending else value, i)
        if isinstance(value, str):
            return (1, _Desc(value) if descending else value, i)
        return (3, 0, i)

    kept = [i for i in range(len(rows)) if text is None or matches(parse(text), rows[i])]
    return [f"x{i}" for i in sorted(kept, key=rank)]


_MISSING = object()


class _Desc:
    """A string that sorts in reverse."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __lt__(self, other: _Desc) -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.text == other.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=ROWS,
    descending=st.booleans(),
    text=st.sampled_from([None, "n = 1", "not n = 1"]),
    page=st.tuples(st.integers(1, 12), st.integers(0, 20)),
)
# Ties in a descending order: by id ascending, read a value at a time.
@example(
    rows=[{"n": 0, "s": "b"}, {"n": 1, "s": "c"}, {"n": 0, "s": "b"}, {"n": 0, "s": "c"}, {"n": 0}],
    descending=True,
    text=None,
    page=(3, 1),
)
def test_an_ordering_by_a_property_equals_a_plain_sort(
    engine: Engine, rows: list[dict[str, Any]], descending: bool, text: str | None, page: tuple[int, int]
) -> None:
    fill(engine, [{}], [(0, r) for r in rows])
    limit, offset = page
    ask = ListQuery(ordering="-s" if descending else "s", filter=text, limit=limit, offset=offset)
    _, names = _names(engine, ask)
    assert names == _reference(rows, descending, text)[offset : offset + limit]


# The `and` of atoms most of all, over rows most of which match some of them: its count is read
# from the atoms' index rows.
DENSE = st.fixed_dictionaries(
    {}, optional={"n": st.integers(0, 2), "s": st.sampled_from(["a", "ab"]), "b": st.booleans()}
)
N, S, B = Key(("n",)), Key(("s",)), Key(("b",))
DENSE_ATOMS = st.one_of(
    st.builds(Compare, st.just(N), st.sampled_from(["=", "!=", "<", ">="]), st.integers(0, 2)),
    st.builds(Compare, st.just(S), st.sampled_from(["=", ">"]), st.sampled_from(["a", "ab"])),
    st.builds(Like, st.just(S), st.sampled_from(["a%", "%b"]), st.booleans()),
    st.builds(Compare, st.just(B), st.just("="), st.booleans()),
    st.builds(Exists, st.sampled_from([N, S, B])),
)
# An equality among them: its index holds its rows in id order, and a page is read from it.
EQUALITIES = st.one_of(
    st.builds(Compare, st.just(N), st.just("="), st.integers(0, 2)),
    st.builds(Compare, st.just(S), st.just("="), st.sampled_from(["a", "ab"])),
)
ANDS = st.builds(
    lambda first, xs: And((first, *xs)),
    st.one_of(EQUALITIES, DENSE_ATOMS),
    st.lists(st.one_of(DENSE_ATOMS, DENSE_ATOMS, filters), min_size=1, max_size=2),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.one_of(DENSE, DENSE, property_sets), min_size=1, max_size=16),
    node=st.one_of(ANDS, ANDS, filters),
    caps=st.tuples(st.sampled_from([0, 0, 1, 3]), st.sampled_from([1, 3, 20]), st.sampled_from([0, 2, 100])),
    limit=st.integers(1, 5),
)
def test_a_capped_count_and_its_page_equal_the_plain_evaluator(
    engine: Engine, rows: list[dict[str, Any]], node: Node, caps: tuple[int, int, int], limit: int
) -> None:
    """The count capped at COUNT_CAP, read from the atoms' index rows when no set of ids bounds
    the filter (joined on PostgreSQL; on SQLite from the smallest atom, counted up to
    DRIVER_BOUND, the others probed), and the first page: as the plain evaluator says."""
    fill(engine, [{}], [(0, r) for r in rows])
    want = [f"x{i}" for i, r in enumerate(rows) if matches(node, r)]
    cap, count_cap, bound = caps
    with (
        mock.patch.object(search, "CAP", cap),
        mock.patch.object(queries, "COUNT_CAP", count_cap),
        mock.patch.object(queries, "DRIVER_BOUND", bound),
    ):
        ask = ListQuery(filter=render(node), limit=limit, exact_count=False)
        listed, names = _names(engine, ask)
        # The next page, from the keyset cursor and from the offset.
        _, after = _names(engine, replace(ask, after=listed.after))
        _, offset = _names(engine, replace(ask, offset=limit))
    capped = len(want) > count_cap and len(want) > limit
    assert (listed.count, listed.count_exact) == ((count_cap, False) if capped else (len(want), True))
    assert names == want[:limit]
    assert listed.more == (len(want) > limit)
    if listed.more:
        assert after == offset == want[limit : 2 * limit]
