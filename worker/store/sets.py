"""The set of owners a list request names (its exact matches and filter), as a query of ids:
what facets, keys and exports read, so that they see the rows the list would show."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .datums import DatumQuery, datum_ids
from .models import Dataset, DatasetVersion, Datum
from .queries import ListQuery, dataset_ids, version_ids
from .search import OwnerKind

Ask = ListQuery | DatumQuery


def narrows(ask: Ask) -> bool:
    """Whether `ask` names anything at all (else the set is every owner of its kind)."""
    if isinstance(ask, DatumQuery):
        return any(v is not None for v in (ask.execution, ask.name, ask.tag)) or bool(ask.filter)
    return bool(ask.filter or ask.name or ask.dataset)


def owner_ids(session: Session, kind: OwnerKind, ask: Ask) -> Any:
    """The set's ids as a query; None for every owner of `kind`; False for none. FilterError if
    the filter does not parse."""
    if not narrows(ask):
        return None
    if kind == "datum":
        assert isinstance(ask, DatumQuery)
        ids = datum_ids(session, ask)
    else:
        assert isinstance(ask, ListQuery)
        ids = dataset_ids(session, ask) if kind == "dataset" else version_ids(session, ask)
    return False if ids is None else ids


def count(session: Session, kind: OwnerKind, ask: Ask) -> int:
    """How many owners the set holds (exact)."""
    ids = owner_ids(session, kind, ask)
    if ids is False:
        return 0
    if ids is None:
        table = {"dataset": Dataset, "version": DatasetVersion, "datum": Datum}[kind]
        return session.scalar(select(func.count()).select_from(table)) or 0
    return session.scalar(select(func.count()).select_from(ids.subquery())) or 0
