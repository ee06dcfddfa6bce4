"""The outbox on both databases: which events an apply (or a quarantine) writes, in its own
transaction; and the sender's claims, outcomes, giving up and retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.orm import Session

from tests.helpers import outcome
from worker.applying import apply_target, apply_targets
from worker.notifications import checked
from worker.staging import Staging
from worker.store import outbox, quarantine, subscriptions
from worker.store.models import Delivery, OutboxEvent
from worker.store.outbox import Outcome
from worker.uris import Target

pytestmark = pytest.mark.redis

FILE = "exec-1/valohai.metadata.jsonl"


def _subscribe(engine: Engine, events: list[str], text: str = "", url: str = "http://127.0.0.1:9/") -> str:
    fields = checked({"url": url, "events": events, "filter": text, "secret": "s"})
    return str(subscriptions.create(engine, fields)["id"])


def _stage(staging: Staging, lines: list[bytes], execution: str = "exec-1") -> None:
    outcomes = [outcome(raw, n, execution) for n, raw in enumerate(lines, 1)]
    staging.stage_lines(f"{execution}/valohai.metadata.jsonl", execution, outcomes, "s")


def _version_line(name: str, meta: str) -> bytes:
    return b'{"dataset-version": "dataset://press/%s", "metadata": %s}' % (name.encode(), meta.encode())


def _events(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        return [e.payload for e in session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))]


def _deliveries(engine: Engine) -> list[Delivery]:
    with Session(engine) as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def _complete(engine: Engine, staging: Staging, name: str) -> None:
    target = Target("version", "press", name)
    staging.complete_version(target)
    apply_target(engine, staging, target)


def test_without_subscriptions_an_apply_writes_no_events(engine: Engine, staging: Staging) -> None:
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    assert _events(engine) == [] and _deliveries(engine) == []


def test_an_apply_writes_one_event_per_owner_changed_and_per_version_completed(
    engine: Engine, staging: Staging
) -> None:
    _subscribe(engine, ["property.changed", "version.completed"])
    _subscribe(engine, ["version.completed"])
    _stage(
        staging,
        [
            _version_line("v1", '{"a": 1}'),
            _version_line("v1", '{"a": 2, "b": true}'),
            b'{"dataset": "dataset://press", "metadata": {"site": "north"}}',
            b'{"file": "img/1.png", "metadata": {"camera": "top"}}',
        ],
    )
    staging.complete_execution("exec-1")
    for key in staging.complete_version(Target("version", "press", "v1")):
        apply_target(engine, staging, Target.parse(key))
    apply_target(engine, staging, Target("dataset", "press"))
    apply_target(engine, staging, Target.for_execution("exec-1"))
    events = _events(engine)
    kinds = sorted((e["type"], e["target"]["kind"]) for e in events)
    assert kinds == [
        ("property.changed", "dataset"),
        ("property.changed", "datum"),
        ("property.changed", "version"),
        ("version.completed", "version"),
    ]
    changed = next(e for e in events if e["type"] == "property.changed" and e["target"]["kind"] == "version")
    assert [(c["key"], c["old"], c["new"]) for c in changed["changes"]] == [
        ("a", None, 1),
        ("a", 1, 2),
        ("b", None, True),
    ]
    assert [c["source"]["line"] for c in changed["changes"]] == [1, 2, 2]
    datum = next(e for e in events if e["target"]["kind"] == "datum")
    assert datum["target"]["path"] == "img/1.png" and datum["uri"] == f"datum://{datum['target']['id']}"
    assert datum["target"]["key"] == "execution:exec-1"
    with Session(engine) as session:
        subs = dict(
            session.execute(select(Delivery.event_id, func.count()).group_by(Delivery.event_id)).all()
        )
    assert sorted(subs.values()) == [1, 1, 1, 2]  # the completion went to both subscribers
    assert {d.status for d in _deliveries(engine)} == {"pending"}


def test_a_filter_is_matched_against_the_owner_after_the_apply(engine: Engine, staging: Staging) -> None:
    _subscribe(engine, ["property.changed"], 'shift = "night"')
    _stage(staging, [_version_line("day", '{"shift": "day"}'), _version_line("night", '{"shift": "night"}')])
    for name in ("day", "night"):
        _complete(engine, staging, name)
    assert [e["uri"] for e in _events(engine)] == ["dataset://press/night"]


def test_a_subscription_made_after_an_apply_is_seen_by_the_next(engine: Engine, staging: Staging) -> None:
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    _subscribe(engine, ["property.changed"])
    _stage(staging, [_version_line("v1", '{"a": 2}')])
    apply_target(engine, staging, Target("version", "press", "v1"))
    assert [[c["new"] for c in e["changes"]] for e in _events(engine)] == [[2]]


def test_a_failed_apply_leaves_no_event(engine: Engine, staging: Staging) -> None:
    _subscribe(engine, ["property.changed", "version.completed"])
    with engine.begin() as conn:  # the history insert fails: the apply rolls back
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'poisoned'; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON property_changes "
                "FOR EACH ROW EXECUTE FUNCTION poison()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON property_changes "
                "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    staging.complete_version(Target("version", "press", "v1"))
    with pytest.raises(Exception, match="poisoned"):
        apply_target(engine, staging, Target("version", "press", "v1"))
    assert _events(engine) == [] and _deliveries(engine) == []


def test_a_quarantine_writes_its_event_matched_against_the_stored_target(
    engine: Engine, staging: Staging
) -> None:
    _subscribe(engine, ["target.quarantined"], "exists a")
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    now = datetime.now(UTC)
    quarantine.record(engine, "dataset://press/v1", "KeyError: x", 6, now)
    quarantine.record(engine, "execution:exec-9", "KeyError: y", 6, now)  # holds no `a`
    events = _events(engine)
    assert len(events) == 1
    assert events[0]["type"] == "target.quarantined" and events[0]["uri"] == "dataset://press/v1"
    assert (events[0]["error"], events[0]["attempts"]) == ("KeyError: x", 6)
    assert outbox.took_events()


def test_a_claim_holds_a_delivery_for_its_lease_and_counts_the_attempt(
    engine: Engine, staging: Staging
) -> None:
    _subscribe(engine, ["property.changed"])
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    now = datetime.now(UTC)
    [held] = outbox.claim(engine, now, 30.0, 10)
    assert held.attempt == 1 and held.payload["type"] == "property.changed" and held.secret == "s"
    assert outbox.claim(engine, now + timedelta(seconds=29), 30.0, 10) == []
    [again] = outbox.claim(engine, now + timedelta(seconds=31), 30.0, 10)  # the holder died
    assert again.attempt == 2
    # The first holder's failure comes late: stale (the delivery moved on), ignored.
    outbox.finish(engine, [Outcome(held, "HTTP 500")], now, 5, lambda _: 1.0)
    assert [(d.status, d.last_error) for d in _deliveries(engine)] == [("pending", "")]
    outbox.finish(engine, [Outcome(again, "HTTP 503")], now, 5, lambda _: 10.0)
    [row] = _deliveries(engine)
    assert (row.status, row.attempts, row.last_error) == ("pending", 2, "try 2: HTTP 503")
    assert outbox.any_due(engine, now + timedelta(seconds=11)) and not outbox.any_due(engine, now)
    # A 2xx always counts, even a late one: the event did arrive.
    outbox.finish(engine, [Outcome(held, None)], now, 5, lambda _: 1.0)
    assert [(d.status, d.last_error) for d in _deliveries(engine)] == [("delivered", "")]
    assert outbox.next_due(engine) is None


def test_a_delivery_is_given_up_after_its_attempts_and_retry_makes_it_pending(
    engine: Engine, staging: Staging
) -> None:
    sub = _subscribe(engine, ["property.changed"])
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    now = datetime.now(UTC)
    for _ in range(3):
        [held] = outbox.claim(engine, now, 30.0, 10)
        outbox.finish(engine, [Outcome(held, "HTTP 500")], now, 3, lambda _: 0.0)
    assert [(d.status, d.attempts) for d in _deliveries(engine)] == [("failed", 3)]
    assert outbox.claim(engine, now + timedelta(days=1), 30.0, 10) == []
    assert outbox.failed_count(engine, sub) == 1 and outbox.failed_count(engine, None) == 1
    assert outbox.retry_failed(engine, sub, now) == 1
    assert [(d.status, d.attempts) for d in _deliveries(engine)] == [("pending", 0)]
    with Session(engine) as session:
        count, log = outbox.deliveries_of(session, sub, 10, 0)
    assert count == 1 and log[0]["status"] == "pending" and log[0]["last_error"] == "try 3: HTTP 500"
    assert log[0]["event"]["type"] == "property.changed" and log[0]["event"]["uri"] == "dataset://press/v1"


def test_deleting_a_subscription_drops_its_deliveries_and_an_orphan_is_dropped_at_claim(
    engine: Engine, staging: Staging
) -> None:
    sub = _subscribe(engine, ["property.changed"])
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    subscriptions.remove(engine, sub)
    assert _deliveries(engine) == []
    # An apply that read the subscription before it went inserts a delivery for it afterwards.
    with engine.begin() as conn:
        event_id = conn.execute(select(OutboxEvent.id)).scalar_one()
        conn.execute(
            insert(Delivery).values(
                subscription_id=12345,
                event_id=event_id,
                status="pending",
                attempts=0,
                last_error="",
                next_at=datetime.now(UTC),
            )
        )
    assert outbox.claim(engine, datetime.now(UTC), 30.0, 10) == []
    assert _deliveries(engine) == []


def test_a_batch_reads_the_subscriptions_once_and_a_no_op_apply_not_at_all(
    engine: Engine, staging: Staging
) -> None:
    _subscribe(engine, ["property.changed"])
    names = [f"v{n}" for n in range(5)]
    _stage(staging, [_version_line(name, '{"a": 1}') for name in names])
    targets = [Target("version", "press", name) for name in names]
    for target in targets:
        staging.complete_version(target)
    reads: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM subscriptions" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        apply_targets(engine, staging, targets)
        assert len(reads) == 1 and len(_events(engine)) == 5
        reads.clear()
        apply_targets(engine, staging, targets)  # nothing new after the watermarks
        assert reads == []
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def test_prune_deletes_old_deliveries_and_unused_events_and_keeps_failed_and_pending(
    engine: Engine, staging: Staging
) -> None:
    _subscribe(engine, ["property.changed"])
    _subscribe(engine, ["property.changed"], url="http://127.0.0.1:10/")
    for n, name in enumerate(("v1", "v2")):
        _stage(staging, [_version_line(name, f'{{"a": {n}}}')])
        _complete(engine, staging, name)
    now = datetime.now(UTC)
    claimed = outbox.claim(engine, now, 30.0, 10)
    assert len(claimed) == 4
    by_event: dict[str, list[outbox.Claimed]] = {}
    for c in claimed:
        by_event.setdefault(c.payload["uri"], []).append(c)
    # v1: delivered to both; v2: delivered to one, given up by the other.
    outcomes = [Outcome(c, None) for c in by_event["dataset://press/v1"]]
    first, second = by_event["dataset://press/v2"]
    outcomes += [Outcome(first, None), Outcome(second, "HTTP 500")]
    outbox.finish(engine, outcomes, now, 1, lambda _: 1.0)
    assert outbox.prune(engine, now - timedelta(seconds=1)) == 0  # nothing that old
    assert outbox.prune(engine, now + timedelta(seconds=1)) == 3
    assert [(d.status, d.last_error) for d in _deliveries(engine)] == [("failed", "try 1: HTTP 500")]
    assert [e["uri"] for e in _events(engine)] == ["dataset://press/v2"]  # still needed


def test_status_shows_the_deliveries_and_calls_given_up_or_overdue_ones_problems(
    engine: Engine, staging: Staging
) -> None:
    from worker.status import collect

    _subscribe(engine, ["property.changed"])
    _subscribe(engine, ["property.changed"], url="http://127.0.0.1:10/")
    _stage(staging, [_version_line("v1", '{"a": 1}')])
    _complete(engine, staging, "v1")
    staging.beat("worker", "w", {}, ttl=60)
    report = collect(staging, stuck_after=300, engine=engine)
    assert report["deliveries"]["pending"] == 2 and report["problems"] == []
    now = datetime.now(UTC)
    first, _ = outbox.claim(engine, now, 30.0, 1) + [None]
    assert first is not None
    outbox.finish(engine, [Outcome(first, "HTTP 500")], now, 1, lambda _: 1.0)
    later = collect(staging, stuck_after=0.0, engine=engine)
    assert (later["deliveries"]["failed"], later["deliveries"]["pending"]) == (1, 1)
    assert later["deliveries"]["oldest_due_seconds"] > 0
    assert any("given up" in p for p in later["problems"])
    assert any("has been due for" in p for p in later["problems"])
