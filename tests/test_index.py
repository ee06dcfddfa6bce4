"""The search index after partial re-indexes equals a full re-index from scratch, on both databases."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from worker.merge import merge
from worker.records import Entry, Source
from worker.store.apply import Applier
from worker.store.index import PARTIAL_MAX_KEYS, index_rows, reindex
from worker.store.models import Dataset, PropertyChange, PropertyIndex
from worker.uris import Target

# Keys chosen to trip a prefix match on the stored path (a JSON array of the keys): a key that
# is a prefix of another, keys holding the characters JSON escapes or LIKE treats specially.
KEYS = ["a", "a,", 'a"', "ab", "a.b", "%", "_", "\\", "[", "é", "k0", "k1", "k2", "k3"]
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-1000, 1000, allow_nan=False, width=32),  # JSONB reads 3.6e16 back as an int
    st.sampled_from(["", "x", "X", "a", "night", "é", "%_"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=2), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)
PROPERTIES = st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=4, max_size=10)
# A change set: a value (any type, nested or not) or null (delete) for a few keys.
CHANGES = st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), VALUES), max_size=3)

_COLUMNS = ("path", "vtype", "num", "str_key", "str_value", "str_lower", "bool_value")
_counter = itertools.count()


def stored_rows(session: Session, owner_id: int) -> Counter[tuple[Any, ...]]:
    columns = [getattr(PropertyIndex, c) for c in _COLUMNS]
    rows = session.execute(
        select(*columns).where(PropertyIndex.owner_kind == "dataset", PropertyIndex.owner_id == owner_id)
    )
    return Counter(tuple(r) for r in rows)


def expected_rows(properties: dict[str, Any]) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r[c] for c in _COLUMNS) for r in index_rows("dataset", 0, properties))


def entry(name: str, metadata: dict[str, Any]) -> Entry:
    return Entry(Target("dataset", name), "set", Source("api"), metadata)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=PROPERTIES, later=st.lists(CHANGES, min_size=1, max_size=4))
def test_partial_reindex_equals_full_reindex(
    engine: Engine, initial: dict[str, Any], later: list[dict[str, Any]]
) -> None:
    name = f"ds-{next(_counter)}"
    expected = initial
    with engine.begin() as conn:
        applier = Applier(conn, datetime.now(UTC))
        applier.set(applier.dataset(name), entry(name, initial))
        applier.flush()
    # Each later change set is its own apply (a late write): only its keys are re-indexed.
    for changes in later:
        expected, _ = merge(expected, changes)
        with engine.begin() as conn:
            applier = Applier(conn, datetime.now(UTC))
            applier.set(applier.dataset(name), entry(name, changes))
            applier.flush()
    with Session(engine) as session, session.begin():
        owner = session.scalars(select(Dataset).where(Dataset.name == name)).one()
        assert owner.properties == expected
        after_partial = stored_rows(session, owner.id)
        assert after_partial == expected_rows(expected)
        reindex(session.connection(), "dataset", owner.id, expected)  # from scratch
        assert stored_rows(session, owner.id) == after_partial


@pytest.mark.parametrize("changed", [1, PARTIAL_MAX_KEYS, PARTIAL_MAX_KEYS + 1])
def test_reindex_of_changed_keys_touches_only_them(engine: Engine, changed: int) -> None:
    """Partial (few keys) and full (many keys) give the same rows; unchanged keys keep theirs."""
    properties: dict[str, Any] = {
        f"k{i}": {"n": i, "s": f"v{i}", "deep": {"b": i % 2 == 0}} for i in range(200)
    }
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        owner = Dataset(name="d", properties=properties, created_at=now, updated_at=now)
        session.add(owner)
        session.flush()
        reindex(session.connection(), "dataset", owner.id, properties)
        untouched = session.scalars(select(PropertyIndex.id).where(PropertyIndex.path.like('["k199"%'))).all()
        keys = [f"k{i}" for i in range(changed)]
        for i, key in enumerate(keys):
            if i % 3 == 0:
                del properties[key]
            elif i % 3 == 1:
                properties[key] = "now a string"
            else:
                properties[key] = {"n": {"x": None}}
        reindex(session.connection(), "dataset", owner.id, properties, keys)
        assert stored_rows(session, owner.id) == expected_rows(properties)
        kept = session.scalars(select(PropertyIndex.id).where(PropertyIndex.path.like('["k199"%'))).all()
        if changed <= PARTIAL_MAX_KEYS:
            assert kept == untouched  # the rows of keys that did not change were left alone


def test_no_op_apply_writes_nothing(engine: Engine) -> None:
    """Entries that change nothing add no history and leave the index rows as they were."""
    with engine.begin() as conn:
        applier = Applier(conn, datetime.now(UTC))
        applier.set(applier.dataset("d"), entry("d", {"a": 1, "b": {"c": "x"}}))
        applier.flush()
    with Session(engine) as session:
        ids = session.scalars(select(PropertyIndex.id).order_by(PropertyIndex.id)).all()
        history = session.scalars(select(PropertyChange.id)).all()
    with engine.begin() as conn:
        applier = Applier(conn, datetime.now(UTC))
        applier.set(applier.dataset("d"), entry("d", {"a": 1, "missing": None}))
        applier.flush()
    with Session(engine) as session:
        assert session.scalars(select(PropertyIndex.id).order_by(PropertyIndex.id)).all() == ids
        assert session.scalars(select(PropertyChange.id)).all() == history


def test_history_rows_keep_their_order_and_json(engine: Engine) -> None:
    """History inserted in one statement: ids follow the order of the changes; nulls are SQL NULL."""
    with engine.begin() as conn:
        applier = Applier(conn, datetime.now(UTC))
        owner = applier.dataset("d")
        for metadata in ({"a": 1, "b": [1, {"x": None}]}, {"a": None, "c": {"d": "e"}}, {"b": "s"}):
            applier.set(owner, entry("d", metadata))
        applier.flush()
    with Session(engine) as session:
        history = session.scalars(select(PropertyChange).order_by(PropertyChange.id)).all()
        assert [(h.key, h.old, h.new) for h in history] == [
            ("a", None, 1),
            ("b", None, [1, {"x": None}]),
            ("a", 1, None),
            ("c", None, {"d": "e"}),
            ("b", [1, {"x": None}], "s"),
        ]
        assert all(h.source == {"origin": "api"} for h in history)
        nulls = session.scalar(
            select(PropertyChange.id).where(PropertyChange.key == "a", PropertyChange.new.is_(None))
        )
        assert nulls is not None


@pytest.mark.postgres
def test_index_delete_keeps_using_the_owner_index_as_the_table_grows(pg_schema_url: str) -> None:
    """A worker that starts on an empty database must not keep the plan it made then.

    psycopg prepares the re-index DELETE on the server after a few runs; PostgreSQL's generic plan
    for an empty `property_index` scans every row of the owner kind (`ix_property_index_str` on
    `owner_kind` alone), and a worker kept it until autovacuum analysed the table: applies got
    slower with every version. Run the DELETE many times on an empty table, fill it, then ask
    PostgreSQL which plan the prepared statement now runs.
    """
    from sqlalchemy import text

    from worker.store.db import make_engine
    from worker.store.models import Base

    engine = make_engine(pg_schema_url, pool_size=1, max_overflow=0)
    Base.metadata.create_all(engine)
    try:
        with engine.connect() as conn:
            for owner_id in range(30):  # past psycopg's prepare threshold and PostgreSQL's 5 custom plans
                with Session(bind=conn) as session, session.begin():
                    reindex(session.connection(), "version", owner_id, {f"k{i}": i for i in range(3)})
            conn.execute(
                text(
                    "INSERT INTO property_index (owner_kind, owner_id, path, vtype, num) "
                    "SELECT 'version', g / 100, 'p' || (g % 100), 'number', g "
                    "FROM generate_series(1, 50000) g"
                )
            )
            prepared = (
                "SELECT name FROM pg_prepared_statements WHERE statement LIKE 'DELETE FROM property_index%'"
            )
            name = conn.execute(text(prepared)).scalar_one()
            # The third parameter: the path of `valohai.last-used`, which a full re-index spares.
            explain = f"""EXPLAIN EXECUTE {name}('version', 7, '["valohai.last-used"]')"""
            plan = "\n".join(conn.execute(text(explain)).scalars())
            conn.rollback()
    finally:
        engine.dispose()
    assert "ix_property_index_owner" in plan, plan
