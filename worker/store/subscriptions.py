"""Subscriptions to change notifications: SQL only (the API and the CLI call these; the apply
reads them through `active`)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, delete, select
from sqlalchemy.orm import Session

from ..errors import NotFound
from ..ids import looks_like_id
from ..notifications import Subscriber, subscriber
from .db import writer
from .models import Delivery, Subscription
from .queries import iso

_TABLE = cast(Table, Subscription.__table__)
_ACTIVE = select(_TABLE.c.id, _TABLE.c.events, _TABLE.c.filter).order_by(_TABLE.c.id)

# Parsed filters by (subscription id, filter text): the apply reads the subscriptions once per
# transaction, and parsing each filter again every time would cost more than reading them.
_PARSED: dict[tuple[int, tuple[str, ...], str], Subscriber] = {}
_LOCK = threading.Lock()
_PARSED_MAX = 10_000


def active(conn: Connection) -> list[Subscriber]:
    """Every subscription, as the apply matches events against them (one small SELECT; none
    when nobody subscribed, and then the apply writes nothing more).

    Race: a subscription created or deleted while an apply runs is seen or not depending on
    when this statement ran; an event of an apply that read none is not sent (a delivery for
    one deleted since is dropped by the sender: `deliveries.subscription_id` has no foreign key)."""
    found = []
    for sub_id, events, text in conn.execute(_ACTIVE):
        key = (sub_id, tuple(events or ()), text or "")
        with _LOCK:
            cached = _PARSED.get(key)
        if cached is None:
            cached = subscriber(sub_id, key[1], key[2])
            with _LOCK:
                if len(_PARSED) >= _PARSED_MAX:
                    _PARSED.clear()
                _PARSED[key] = cached
        found.append(cached)
    return found


def create(engine: Engine, fields: dict[str, Any]) -> dict[str, Any]:
    """Store a subscription (`notifications.checked` fields); answered as `shown`."""
    with Session(writer(engine)) as session, session.begin():
        row = Subscription(**fields, created_at=datetime.now(UTC))
        session.add(row)
        session.flush()
        return shown(row)


def listed(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [shown(r) for r in session.scalars(select(Subscription).order_by(Subscription.id))]


def get(engine: Engine, ref: str) -> dict[str, Any]:
    with Session(engine) as session:
        return shown(find(session, ref))


def remove(engine: Engine, ref: str) -> None:
    """Delete a subscription and its deliveries (sent or not): nothing more is sent to it."""
    with Session(writer(engine)) as session, session.begin():
        row = find(session, ref)
        session.execute(delete(Delivery).where(Delivery.subscription_id == row.id))
        session.execute(delete(Subscription).where(Subscription.id == row.id))


def remove_all(engine: Engine) -> None:
    """Delete every subscription and every delivery (`DELETE /api/v0/subscriptions/`)."""
    with writer(engine).begin() as conn:
        conn.execute(delete(Delivery))
        conn.execute(delete(Subscription))


def find(session: Session, ref: str) -> Subscription:
    """The subscription of public id `ref`; NotFound otherwise."""
    row = None
    if looks_like_id(ref):
        row = session.scalar(select(Subscription).where(Subscription.uid == ref.lower()))
    if row is None:
        raise NotFound(f"subscription {ref[:100]}")
    return row


def shown(row: Subscription) -> dict[str, Any]:
    """A subscription as the API answers it: never its secret."""
    return {
        "id": row.uid,
        "url": row.url,
        "events": list(row.events or []),
        "filter": row.filter,
        "created_at": iso(row.created_at),
    }
