"""The SQL of `sidecar rollback`: what one maker (an execution, a rollback) changed, the history
of those keys since, the owners' values now; and the keys a rollback's apply really reverted.

`worker/rollback.py` judges each key; `worker/applying.py` stages and applies the reverts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Table, and_, func, select

from ..rollback import Change, Conflict, Revert, judge
from ..uris import Target
from .models import Datum, FinishedExecution, PropertyChange
from .queries import OWNER_ROWS

_CHANGES = cast(Table, PropertyChange.__table__)
_DATUMS = cast(Table, Datum.__table__)
_FINISHED = cast(Table, FinishedExecution.__table__)
_CHUNK = 500


@dataclass
class OwnerPlan:
    """One owner's part of a rollback: its staging target (and datum path), what is reverted,
    what is left as it is."""

    kind: str  # "dataset", "version" or "datum"
    owner_id: int
    uid: str
    target: Target
    path: str = ""  # a datum's
    reverts: list[Revert] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)


def is_known(conn: Connection, ident: str) -> bool:
    """Whether the database knows `ident` as a maker of changes or as an execution."""
    for statement in (
        select(_CHANGES.c.id).where(_CHANGES.c.made_by == ident).limit(1),
        select(_DATUMS.c.id).where(_DATUMS.c.execution == ident).limit(1),
        select(_FINISHED.c.execution).where(_FINISHED.c.execution == ident),
    ):
        if conn.execute(statement).first() is not None:
            return True
    return False


def plan(conn: Connection, maker: str) -> list[OwnerPlan]:
    """Every owner whose properties `maker` changed, with each key judged (`rollback.judge`),
    in history order of the owners' first changes by the maker. Owners with nothing to do are
    left out."""
    first = (
        select(
            _CHANGES.c.owner_kind,
            _CHANGES.c.owner_id,
            _CHANGES.c.key,
            func.min(_CHANGES.c.id).label("first"),
        )
        .where(_CHANGES.c.made_by == maker)
        .group_by(_CHANGES.c.owner_kind, _CHANGES.c.owner_id, _CHANGES.c.key)
        .subquery()
    )
    # Each key's rows from the maker's first change of it on (the owner index, then the key).
    rows = conn.execute(
        select(
            _CHANGES.c.owner_kind,
            _CHANGES.c.owner_id,
            _CHANGES.c.key,
            _CHANGES.c.old,
            _CHANGES.c.new,
            _CHANGES.c.source,
            _CHANGES.c.made_by,
            first.c.first,
        )
        .join(
            first,
            and_(
                _CHANGES.c.owner_kind == first.c.owner_kind,
                _CHANGES.c.owner_id == first.c.owner_id,
                _CHANGES.c.key == first.c.key,
                _CHANGES.c.id >= first.c.first,
            ),
        )
        .order_by(_CHANGES.c.owner_kind, _CHANGES.c.owner_id, _CHANGES.c.id)
    )
    history: dict[tuple[str, int], dict[str, list[Change]]] = {}
    order: dict[tuple[str, int], int] = {}
    for r in rows:
        owner = (r.owner_kind, r.owner_id)
        order[owner] = min(order.get(owner, r.first), r.first)
        history.setdefault(owner, {}).setdefault(r.key, []).append(Change(r.made_by, r.old, r.new, r.source))
    owners = _owners(conn, sorted(history, key=order.__getitem__))
    plans = []
    for owner in sorted(history, key=order.__getitem__):
        found = owners.get(owner)
        if found is None:
            continue  # the owner row is gone: nothing to put back
        owner_plan, properties = found
        for key, changes in history[owner].items():
            verdict = judge(key, changes, maker, properties.get(key))
            if isinstance(verdict, Revert):
                owner_plan.reverts.append(verdict)
            elif isinstance(verdict, Conflict):
                owner_plan.conflicts.append(verdict)
        if owner_plan.reverts or owner_plan.conflicts:
            plans.append(owner_plan)
    return plans


def made_by(conn: Connection, maker: str) -> set[tuple[str, int, str]]:
    """(owner kind, owner id, key) of every change `maker` made (a rollback: what it reverted)."""
    statement = select(_CHANGES.c.owner_kind, _CHANGES.c.owner_id, _CHANGES.c.key).where(
        _CHANGES.c.made_by == maker
    )
    return {(r.owner_kind, r.owner_id, r.key) for r in conn.execute(statement)}


def _owners(
    conn: Connection, owners: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], tuple[OwnerPlan, dict[str, Any]]]:
    """Each owner's plan (target, ids) and its properties now, read in chunks per table."""
    ids: dict[str, list[int]] = {"dataset": [], "version": [], "datum": []}
    for kind, owner_id in owners:
        ids[kind].append(owner_id)
    out: dict[tuple[str, int], tuple[OwnerPlan, dict[str, Any]]] = {}
    for start in range(0, max(len(v) for v in ids.values()), _CHUNK):
        chunk = {kind: found[start : start + _CHUNK] for kind, found in ids.items()}
        r: Any
        for r in conn.execute(OWNER_ROWS["dataset"], {"ids": chunk["dataset"]}):
            plan_ = OwnerPlan("dataset", r.id, r.uid, Target("dataset", r.name))
            out[("dataset", r.id)] = (plan_, r.properties or {})
        for r in conn.execute(OWNER_ROWS["version"], {"ids": chunk["version"]}):
            plan_ = OwnerPlan("version", r.id, r.uid, Target("version", r.dataset, r.name))
            out[("version", r.id)] = (plan_, r.properties or {})
        for r in conn.execute(OWNER_ROWS["datum"], {"ids": chunk["datum"]}):
            plan_ = OwnerPlan("datum", r.id, r.uid, Target("execution", execution=r.execution), r.path)
            out[("datum", r.id)] = (plan_, r.properties or {})
    return out
