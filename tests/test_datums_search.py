"""Datum search: the filter language over datums' properties equals the plain-Python evaluator on
both databases, and the three owner kinds never see each other's index rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.test_search import corpus, filters, populate
from worker.query import Node, matches, render
from worker.store.datums import DatumQuery, list_datums
from worker.store.index import reindex
from worker.store.models import Datum


def populate_datums(engine: Engine, property_sets: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for i, props in enumerate(property_sets):
            datum = Datum(execution="e", path=f"f{i}", properties=props, created_at=now, updated_at=now)
            session.add(datum)
            session.flush()
            reindex(session.connection(), "datum", datum.id, props)


def search(engine: Engine, text: str, **kw: Any) -> list[str]:
    with Session(engine) as session:
        _, rows = list_datums(session, DatumQuery(filter=text, limit=1000, **kw))
        return [r.path for r in rows]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(node=filters)
def test_datum_filters_equal_the_python_evaluator(engine: Engine, node: Node) -> None:
    datum_sets = corpus(seed=11)
    if not getattr(engine, "_datum_corpus", False):
        populate_datums(engine, datum_sets)
        populate(engine, corpus(seed=7))  # datasets and versions with other values, same keys
        engine._datum_corpus = True  # type: ignore[attr-defined]
    expected = [f"f{i}" for i, props in enumerate(datum_sets) if matches(node, props)]
    assert search(engine, render(node)) == expected
    # Narrowed by a column first (the candidates path of OwnerSets), the same answer.
    assert search(engine, render(node), execution="e") == expected
