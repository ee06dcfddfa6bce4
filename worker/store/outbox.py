"""The outbox of change notifications, SQL only: events written in the transaction of the apply
(or quarantine) that made them, one delivery per event and subscriber, and the sender's claims
and outcomes (`worker/delivering.py` does the HTTP).

At-least-once: an event exists if and only if its change committed, and a delivery stays
pending until a receiver answered 2xx for it (or it is given up). A sender claims deliveries
by moving their `next_at` a lease ahead (and counting the attempt) in a short transaction of
its own, then POSTs outside any transaction: a slow receiver never holds a lock an apply
waits for. A sender that dies mid-send leaves its claims to come due again when the lease ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, delete, exists, func, insert, select, update
from sqlalchemy.orm import Session

from ..ids import new_id
from ..notifications import (
    PROPERTY_CHANGED,
    TARGET_QUARANTINED,
    VERSION_COMPLETED,
    Subscriber,
    TargetRef,
    changes_json,
    event,
    gives_up,
    short_error,
)
from ..uris import Target
from . import definitions
from .db import writer
from .models import Dataset, DatasetVersion, Datum, Delivery, OutboxEvent, Subscription
from .queries import iso
from .subscriptions import active, find

if TYPE_CHECKING:
    from .apply import Applier, Owner

_EVENTS = cast(Table, OutboxEvent.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_SUBS = cast(Table, Subscription.__table__)
_TABLES = {
    "dataset": cast(Table, Dataset.__table__),
    "version": cast(Table, DatasetVersion.__table__),
    "datum": cast(Table, Datum.__table__),
}
_IN_CHUNK = 500

# Set when this thread wrote events (`took_events` reads and clears it): the task that ran the
# apply then asks for a send. Per thread, because the worker's pool runs applies on threads and
# the flag must belong to the apply that set it (a rolled-back one leaves it set: a send that
# finds nothing, which is harmless).
_written = threading.local()


def took_events() -> bool:
    """Whether this thread wrote outbox events since it last asked."""
    found = bool(getattr(_written, "flag", False))
    _written.flag = False
    return found


# -- writing events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """An event to write and the subscribers it goes to."""

    payload: dict[str, Any]
    owner_kind: str | None
    owner_id: int | None
    subscribers: list[int]


def record_apply(applier: Applier, subscribers: Sequence[Subscriber], completed: Sequence[Owner]) -> int:
    """The events of what the applier is writing now, in its transaction: one `property.changed`
    per owner with history rows (its changes in order), one `version.completed` per version that
    completes. Each subscriber's filter is matched here, against the owner's properties after
    the apply (in memory, no SQL), so an event goes only where it is wanted. Returns the events
    written."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in applier.changes:
        grouped.setdefault((row["owner_kind"], row["owner_id"]), []).append(row)
    needed = set(grouped) | {(o.kind, o.id) for o in completed}
    by_id = {(o.kind, o.id): (key, o) for key, o in applier.owners.items() if (o.kind, o.id) in needed}
    wanted: list[tuple[str, tuple[str, ...], Owner, list[int], dict[str, Any]]] = []
    needs = any(s.needs_violations for s in subscribers)
    for (kind, owner_id), rows in grouped.items():
        key, owner = by_id[(kind, owner_id)]
        subs = _wanting(applier, subscribers, PROPERTY_CHANGED, owner, needs)
        if subs:
            wanted.append((PROPERTY_CHANGED, key, owner, subs, {"changes": changes_json(rows)}))
    for owner in completed:
        key, _ = by_id[(owner.kind, owner.id)]
        subs = _wanting(applier, subscribers, VERSION_COMPLETED, owner, needs)
        if subs:
            wanted.append((VERSION_COMPLETED, key, owner, subs, {"completed_at": applier.now.isoformat()}))
    if not wanted:
        return 0
    uids = _uids(applier.conn, [(o.kind, o.id) for _, _, o, _, _ in wanted])
    at = applier.now.isoformat()
    pending = [
        Pending(event(new_id(), kind, _ref(key, uids.get((o.kind, o.id))), at, **extra), o.kind, o.id, subs)
        for kind, key, o, subs, extra in wanted
    ]
    return write(applier.conn, pending, applier.now)


def _wanting(
    applier: Applier, subscribers: Sequence[Subscriber], kind: str, owner: Owner, needs: bool
) -> list[int]:
    violations: list[dict[str, Any]] = []
    if needs:
        found = applier.definitions()
        violations = definitions.owner_violations(found, owner.kind, owner.properties, owner.status)
    return [s.id for s in subscribers if s.wants(kind, owner.properties, violations)]


def _ref(key: tuple[str, ...], uid: str | None) -> TargetRef:
    """The target of an owner from its key in `Applier.owners`."""
    if key[0] == "dataset":
        return TargetRef("dataset", Target("dataset", key[1]).key, uid, dataset=key[1])
    if key[0] == "version":
        return TargetRef(
            "version", Target("version", key[1], key[2]).key, uid, dataset=key[1], version=key[2]
        )
    return TargetRef("datum", Target.for_execution(key[1]).key, uid, execution=key[1], path=key[2])


def _uids(conn: Connection, owners: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The public ids of owners, one SELECT per kind (and chunk)."""
    found: dict[tuple[str, int], str] = {}
    for kind, table in _TABLES.items():
        ids = sorted({i for k, i in owners if k == kind})
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            for row_id, uid in conn.execute(select(table.c.id, table.c.uid).where(table.c.id.in_(chunk))):
                found[(kind, row_id)] = uid
    return found


def record_quarantine(conn: Connection, target_key: str, error: str, attempts: int, at: datetime) -> int:
    """A `target.quarantined` event, in the transaction that records the quarantine. A filter
    is matched against the target's stored properties (a dataset's or version's; an execution
    target holds none of its own, so it matches as an empty set would)."""
    subscribers = active(conn)
    if not subscribers:
        return 0
    target = Target.parse(target_key)
    kind, owner_id, uid, properties, violations = _owner_of(conn, target)
    subs = [s.id for s in subscribers if s.wants(TARGET_QUARANTINED, properties, violations)]
    if not subs:
        return 0
    ref = TargetRef(
        kind,
        target.key,
        uid,
        dataset=target.dataset or None,
        version=target.version or None,
        execution=target.execution or None,
    )
    payload = event(new_id(), TARGET_QUARANTINED, ref, at.isoformat(), error=error, attempts=attempts)
    return write(conn, [Pending(payload, kind if owner_id is not None else None, owner_id, subs)], at)


def _owner_of(
    conn: Connection, target: Target
) -> tuple[str, int | None, str | None, dict[str, Any], list[Any]]:
    """(kind, id, public id, properties, violations) of a quarantined target's owner, if stored."""
    datasets, versions = _TABLES["dataset"], _TABLES["version"]
    if target.kind == "execution":
        return "execution", None, None, {}, []
    columns = (datasets.c.id, datasets.c.uid, datasets.c.properties, datasets.c.violations)
    query: Any = select(*columns).where(datasets.c.name == target.dataset)
    if target.kind == "version":
        columns = (versions.c.id, versions.c.uid, versions.c.properties, versions.c.violations)
        query = (
            select(*columns)
            .join(datasets, datasets.c.id == versions.c.dataset_id)
            .where(datasets.c.name == target.dataset, versions.c.name == target.version)
        )
    row = conn.execute(query).first()
    if row is None:
        return target.kind, None, None, {}, []
    return target.kind, row[0], row[1], row[2] or {}, list(row[3] or [])


def write(conn: Connection, pending: Sequence[Pending], now: datetime) -> int:
    """Insert the events and their deliveries (pending, due now), in the caller's transaction."""
    if not pending:
        return 0
    rows = [
        {
            "uid": p.payload["id"],
            "type": p.payload["type"],
            "owner_kind": p.owner_kind,
            "owner_id": p.owner_id,
            "target": p.payload["target"]["key"],
            "uri": p.payload["uri"],
            "payload": p.payload,
            "created_at": now,
        }
        for p in pending
    ]
    # One statement for the events and their ids (RETURNING, batched by SQLAlchemy on both
    # databases); the deliveries refer to them.
    inserted = conn.execute(insert(_EVENTS).returning(_EVENTS.c.uid, _EVENTS.c.id), rows)
    ids: dict[str, int] = {uid: event_id for uid, event_id in inserted}
    deliveries = [
        {
            "subscription_id": sub,
            "event_id": ids[p.payload["id"]],
            "status": "pending",
            "attempts": 0,
            "last_error": "",
            "next_at": now,
        }
        for p in pending
        for sub in p.subscribers
    ]
    conn.execute(insert(_DELIVERIES), deliveries)
    _written.flag = True
    return len(pending)


# -- the sender's side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A delivery a sender holds until `lease` ends: try number `attempt`, to `url`."""

    id: int
    attempt: int
    url: str
    secret: str
    payload: dict[str, Any]


_D = _DELIVERIES.c
_DUE = (
    select(_D.id, _D.attempts, _SUBS.c.url, _SUBS.c.secret, _EVENTS.c.payload)
    .join(_EVENTS, _EVENTS.c.id == _D.event_id)
    .outerjoin(_SUBS, _SUBS.c.id == _D.subscription_id)
    .where(_D.status == "pending", _D.next_at <= bindparam("now"))
    .order_by(_D.next_at, _D.id)
    .limit(bindparam("limit"))
)
# Two senders at once: on PostgreSQL each skips the rows the other is claiming; on SQLite the
# claim's `BEGIN IMMEDIATE` holds the write lock, so the second sees the first's new `next_at`.
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True, of=_DELIVERIES)
_CLAIM = (
    update(_DELIVERIES)
    .where(_D.id == bindparam("delivery"))
    .values(attempts=_D.attempts + 1, next_at=bindparam("lease_end"))
)


def claim(engine: Engine, now: datetime, lease: float, limit: int) -> list[Claimed]:
    """Up to `limit` deliveries due at `now`, each with its attempt counted and held for `lease`
    seconds. Deliveries of a deleted subscription are dropped."""
    with writer(engine).begin() as conn:
        statement = _DUE_LOCKED if conn.dialect.name == "postgresql" else _DUE
        rows = conn.execute(statement, {"now": now, "limit": limit}).all()
        orphans = [r.id for r in rows if r.url is None]
        if orphans:
            conn.execute(delete(_DELIVERIES).where(_D.id.in_(orphans)))
        live = [r for r in rows if r.url is not None]
        if live:
            end = now + timedelta(seconds=lease)
            conn.execute(_CLAIM, [{"delivery": r.id, "lease_end": end} for r in live])
    return [Claimed(r.id, r.attempts + 1, r.url, r.secret, r.payload) for r in live]


@dataclass(frozen=True)
class Outcome:
    """How one try went: `error` is None when the receiver answered 2xx."""

    claimed: Claimed
    error: str | None


_DELIVERED = (
    update(_DELIVERIES)
    .where(_D.id == bindparam("delivery"))
    .values(status="delivered", delivered_at=bindparam("at"), last_error="")
)
# A failure counts only for the try that failed: if the lease ran out and another sender tried
# again meanwhile (`attempts` moved on), or that one delivered it, this outcome is stale.
_FAILED = (
    update(_DELIVERIES)
    .where(_D.id == bindparam("delivery"), _D.attempts == bindparam("attempt"), _D.status == "pending")
    .values(status=bindparam("state"), next_at=bindparam("next"), last_error=bindparam("error"))
)


Delay = Callable[[int], float]  # seconds before the next try after `attempts` failed ones


def finish(engine: Engine, outcomes: Sequence[Outcome], now: datetime, limit: int, delay: Delay) -> None:
    """Record the tries: delivered; or failed, due again after `delay(attempts)` seconds, or
    given up (`failed`) after `limit` attempts. One short transaction."""
    delivered = [{"delivery": o.claimed.id, "at": now} for o in outcomes if o.error is None]
    failed = []
    for o in outcomes:
        if o.error is None:
            continue
        attempt = o.claimed.attempt
        state = "failed" if gives_up(attempt, limit) else "pending"
        due = now + timedelta(seconds=delay(attempt))
        error = short_error(f"try {attempt}: {o.error}")
        failed.append(
            {"delivery": o.claimed.id, "attempt": attempt, "state": state, "next": due, "error": error}
        )
    with writer(engine).begin() as conn:
        if delivered:
            conn.execute(_DELIVERED, delivered)
        if failed:
            conn.execute(_FAILED, failed)


def next_due(engine: Engine) -> datetime | None:
    """When the earliest pending delivery is due (None: none pending)."""
    with engine.connect() as conn:
        found = conn.execute(select(func.min(_D.next_at)).where(_D.status == "pending")).scalar()
    return None if found is None else _aware(found)


def any_due(engine: Engine, now: datetime) -> bool:
    """Whether a delivery is due at `now` (the sweep's check: one indexed read)."""
    with engine.connect() as conn:
        query = select(_D.id).where(_D.status == "pending", _D.next_at <= now).limit(1)
        return conn.execute(query).first() is not None


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- the delivery log and retries ----------------------------------------------------------------


def deliveries_of(
    session: Session, ref: str, limit: int, offset: int, status: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """(how many, one page newest first) of a subscription's deliveries (of one `status`, if
    given): status, attempts, last error, when due again (pending) or delivered, and the event."""
    sub = find(session, ref)
    where = [_D.subscription_id == sub.id] + ([_D.status == status] if status is not None else [])
    count = session.scalar(select(func.count()).select_from(_DELIVERIES).where(*where)) or 0
    event = (_EVENTS.c.uid, _EVENTS.c.type, _EVENTS.c.target, _EVENTS.c.uri, _EVENTS.c.created_at)
    query = (
        select(_D.id, _D.status, _D.attempts, _D.last_error, _D.next_at, _D.delivered_at, *event)
        .join(_EVENTS, _EVENTS.c.id == _D.event_id)
        .where(*where)
        .order_by(_D.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return count, [_delivery_json(r) for r in session.execute(query)]


def _delivery_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "event": {
            "id": row.uid,
            "type": row.type,
            "target": row.target,
            "uri": row.uri,
            "created_at": iso(row.created_at),
        },
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "next_at": iso(row.next_at) if row.status == "pending" else None,
        "delivered_at": iso(row.delivered_at),
    }


def retry_failed(engine: Engine, ref: str | None, now: datetime) -> int:
    """`sidecar deliveries retry`: the given-up deliveries (of one subscription, or all) pending
    again, due now, their attempts counted from zero. Returns how many."""
    with Session(writer(engine)) as session, session.begin():
        query = update(_DELIVERIES).where(_D.status == "failed")
        if ref is not None:
            query = query.where(_D.subscription_id == find(session, ref).id)
        done = session.execute(query.values(status="pending", attempts=0, next_at=now))
        return int(getattr(done, "rowcount", 0) or 0)


def failed_count(engine: Engine, ref: str | None) -> int:
    """How many deliveries (of one subscription, or all) are given up."""
    with Session(engine) as session:
        query = select(func.count()).select_from(_DELIVERIES).where(_D.status == "failed")
        if ref is not None:
            query = query.where(_D.subscription_id == find(session, ref).id)
        return int(session.scalar(query) or 0)


def prune(engine: Engine, before: datetime, limit: int = 10_000) -> int:
    """Delete up to `limit` deliveries delivered before `before`, then the events from before it
    that no delivery refers to any more (delivered, or their subscription deleted). Failed and
    pending deliveries, and their events, stay. Returns the deliveries deleted."""
    old = select(_D.id).where(_D.status == "delivered", _D.delivered_at < before).limit(limit)
    unused = ~exists().where(_D.event_id == _EVENTS.c.id)
    with writer(engine).begin() as conn:
        done = conn.execute(delete(_DELIVERIES).where(_D.id.in_(old.scalar_subquery())))
        conn.execute(delete(_EVENTS).where(_EVENTS.c.created_at < before, unused))
    return int(getattr(done, "rowcount", 0) or 0)


def summary(engine: Engine, now: datetime) -> dict[str, Any]:
    """Deliveries by status, and how long the longest-due pending one has waited (`sidecar
    status`): the seconds since its `next_at`, 0 when none is due."""
    with engine.connect() as conn:
        rows = conn.execute(select(_D.status, func.count()).group_by(_D.status)).all()
        due = conn.execute(
            select(func.min(_D.next_at)).where(_D.status == "pending", _D.next_at <= now)
        ).scalar()
    found: dict[str, Any] = {"pending": 0, "delivered": 0, "failed": 0}
    found.update({status: int(n) for status, n in rows})
    found["oldest_due_seconds"] = round((now - _aware(due)).total_seconds(), 3) if due is not None else 0.0
    return found
