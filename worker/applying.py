"""The apply, end to end: a snapshot read from staging, one database transaction, then the
finish (leave the due set, trim) in staging.

This module sits above both `staging/` (Redis) and `store/` (SQL): the store's part is the SQL
work given entries already read (`store/apply.py`), staging's part is the Redis reads and
writes; the order between them, which the races below depend on, is kept here. API writes that
go through a target's stream (a dataset's, a version's, or a datum's execution) are here too:
they stage, then apply as the worker does.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from .errors import NotFound
from .ids import new_id
from .records import Entry, Source, user_write
from .rollback import Conflict
from .staging import RedisError, Snapshot, Staging, after_watermark
from .store import datums, definitions
from .store import rollback as store_rollback
from .store.apply import (
    Applier,
    apply_entries,
    lock_watermarks,
    save_watermarks,
    sqlite_queue,
    version_is_completed,
)
from .store.db import writer
from .store.queries import Ref
from .store.rollback import OwnerPlan
from .store.writes import WriteResult, current_properties, target_of
from .uris import Target

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    """What one apply did."""

    target: str
    applied: int = 0
    watermark: str | None = None
    skipped: str = ""  # why nothing was done (e.g. the version is still building)
    more: bool = False  # stopped at TRANSACTION_ENTRIES: what is left goes in the next transaction


def apply_target(engine: Engine, staging: Staging, target: Target) -> ApplyResult:
    """Apply every staged entry of `target` after its watermark, in one transaction
    (`apply_targets` of one target)."""
    return apply_targets(engine, staging, [target])[0]


# Entries read per target before the lock in a batch (the rest is read under the lock): a
# batch of 500 targets with long streams must not read half a million entries in one reply.
BATCH_SNAPSHOT = 100
# At most this many entries of one execution or dataset target per transaction. An execution
# of 100,000 datums stages 100,000 entries on its one target: applied whole, it held SQLite's
# write lock for 27 s, and a late line for another version waited all that time. Its datums
# (and a dataset's keys) are independent owners, so applying them a slice at a time, each slice
# committed with the watermark after it, ends where one transaction would. A version's entries
# stay whole: a completed version shows all of its properties at once, never some of them.
TRANSACTION_ENTRIES = 2_000


def apply_targets(engine: Engine, staging: Staging, targets: list[Target]) -> list[ApplyResult]:
    """Apply every staged entry of each target after its watermark: one transaction for all of
    them (`apply_once`), then, for an execution or dataset target with more than
    TRANSACTION_ENTRIES entries, one more per slice of it (each a whole `apply_once`: its lock,
    its watermark, its finish). The results add up every round."""
    results = apply_once(engine, staging, targets)
    by_key = {r.target: r for r in results}
    left = [t for t in targets if t.key in by_key and by_key[t.key].more]
    while left:
        for more in apply_once(engine, staging, left):
            total = by_key[more.target]
            total.applied += more.applied
            total.watermark, total.skipped, total.more = more.watermark, more.skipped, more.more
        left = [t for t in left if by_key[t.key].more]
    return results


def apply_once(engine: Engine, staging: Staging, targets: list[Target]) -> list[ApplyResult]:
    """Apply the staged entries of each target after its watermark, all in one transaction
    (an execution's or dataset's up to TRANSACTION_ENTRIES: `ApplyResult.more` says when it
    stopped there).

    Safe to run any number of times, concurrently too: the watermark rows are locked first
    (SELECT ... FOR UPDATE on PostgreSQL, in target order so two batches cannot deadlock;
    BEGIN IMMEDIATE holds SQLite's write lock), and entries after them are taken only once the
    locks are held, so a second apply of a target waits, then sees the new watermark and finds
    nothing left to do. Each target's watermark is saved in the same transaction as its
    entries: the batch commits as a whole or not at all, and a redelivered batch changes
    nothing that was committed.

    The targets are applied in key order, each with its own clock reading, its member entries
    settled before the next starts: the batch equals the same applies run one by one in that
    order (tests/test_batch_apply.py). An error fails the whole batch; the task then applies
    it in halves down to the target that fails alone (`tasks.run_batch`), so one bad target
    cannot hold back the others.
    """
    ordered = sorted({t.key: t for t in targets}.values(), key=lambda t: t.key)
    snapshots = staging.snapshots(ordered, None if len(ordered) == 1 else BATCH_SNAPSHOT)
    results = {t.key: ApplyResult(t.key) for t in ordered}
    work: list[tuple[Target, Snapshot]] = []
    for target, snapshot in zip(ordered, snapshots, strict=True):
        if snapshot.quarantined:
            # Held after too many failed applies: its entries stay staged until `sidecar retry`.
            staging.hold(target)
            results[target.key].skipped = "quarantined"
        else:
            work.append((target, snapshot))
    if not work:
        return [results[t.key] for t in targets if t.key in results]
    finished: list[tuple[Target, str | None, str | None]] = []
    with sqlite_queue(engine, urgent=len(work) == 1), writer(engine).begin() as conn:
        marks = lock_watermarks(conn, [t.key for t, _ in work])
        applier = Applier(conn, _tick(None))
        applier.prefetch(
            [(t, _after(s, marks[t.key]), s.done) for t, s in work], whole=all(s.whole for _, s in work)
        )
        saved: dict[str, tuple[str | None, datetime]] = {}
        for target, snapshot in work:
            result = results[target.key]
            mark = result.watermark = marks[target.key]
            applier.now = _tick(applier.now)
            if target.kind == "version" and not version_completed(conn, staging, target, snapshot.done):
                # Register it, so the API can show a building version; its entries stay staged.
                applier.version(target)
                result.skipped = "version is still building"
                continue
            # The entries after the watermark the lock revealed: the snapshot's, then (for a
            # long stream) read on from Redis under the lock.
            entries = applier.prefetching(staging.read_after(target, mark, snapshot))
            if target.kind != "version":
                entries = itertools.islice(entries, TRANSACTION_ENTRIES)
            result.applied, mark = apply_entries(applier, target, mark, entries)
            result.more = target.kind != "version" and result.applied == TRANSACTION_ENTRIES
            applier.settle()
            saved[target.key] = (mark, applier.now)
            result.watermark = mark
            completed_at = applier.now.isoformat() if target.kind == "version" else None
            finished.append((target, mark, completed_at))
        applier.write()
        save_watermarks(conn, saved)
    # After the commit: a rolled-back apply runs again and finds the same problems.
    for reject in applier.rejects:
        log.warning("rejected %s:%d (offset %d): %s", reject.file, reject.line, reject.offset, reject.reason)
    if applier.rejects:
        staging.record_rejects(applier.rejects)
    # A version's flag may have been lost by Redis (AOF everysec); the database knows better, and
    # `finish` puts it back so that late lines for this version keep being applied by themselves.
    staging.finish_many(finished)
    staging.clear_failures(*(t for t, snapshot in work if snapshot.failed and results[t.key].skipped == ""))
    return [results[t.key] for t in targets if t.key in results]


def _after(snapshot: Snapshot, watermark: str | None) -> list[Entry]:
    """The entries of a snapshot after `watermark` (what the apply will fold of it)."""
    return [entry for _, entry in after_watermark(snapshot.entries, watermark)]


def _tick(last: datetime | None) -> datetime:
    """The clock for the next target of a batch: now, and always after the one before, so that
    `latest` and the history order the batch's targets as one-by-one applies would."""
    now = datetime.now(UTC)
    return now if last is None or now > last else last + timedelta(microseconds=1)


def version_completed(
    conn: Session | Connection, staging: Staging, target: Target, done: bool = False
) -> bool:
    """Whether a version is completed: `done` (its flag, as read before), Redis, or the database."""
    if done or staging.is_done(target):
        return True
    if isinstance(conn, Session):
        return version_is_completed(conn.connection(), target)
    return version_is_completed(conn, target)


# -- API writes: staged on the target's stream, then applied as the worker does -------------------


def write_properties(
    engine: Engine, staging: Staging, kind: str, owner_id: Ref, metadata: Any
) -> WriteResult:
    """Apply a user's property write (null deletes) to a dataset or version.

    The write goes through the same stream as sidecar lines, so it is ordered after every line
    staged before it. On a completed target it is applied at once (the same apply the worker
    runs); on a version still building it stays staged and is applied at completion.
    """
    with Session(engine) as session:
        target = target_of(session, kind, owner_id)
    entry: Entry = user_write(target, metadata, Source("api"))
    definitions.refuse_rejected(engine, target.kind, entry.metadata)  # a 400 before staging
    stream_id, _ = staging.stage_write(entry)
    try:
        with Session(engine) as session:
            building = target.kind == "version" and not version_completed(session, staging, target)
        if building:
            return WriteResult(current_properties(engine, kind, owner_id), staged=True)
        apply_target(engine, staging, target)
        return WriteResult(current_properties(engine, kind, owner_id), staged=False)
    except Exception:
        _withdraw(staging, entry, stream_id)
        raise


def write_datum_properties(engine: Engine, staging: Staging, ident: str | int, metadata: Any) -> WriteResult:
    """Apply a user's write (null deletes) to a datum's properties.

    The write is an entry of the datum's execution target, like its datum lines. While the
    execution runs it stays staged (answered `staged`) and is applied at completion, after the
    lines staged before it. Once the execution has completed (its flag in Redis) it is applied at
    once by the same apply the worker runs. An execution whose staging state retention took out
    of Redis (completed, its target applied: a watermark row, no flag) has nothing staged left
    to keep order with: the write is applied directly, in one transaction under the target's
    watermark lock, and Redis is not touched.
    """
    found = datums.write_target(engine, ident)  # an unknown id is a 404 whatever the body
    datums.check_datum_write(metadata)
    definitions.refuse_rejected(engine, "datum", metadata)  # a 400 before staging
    entry = Entry(found.target, "set", Source("api"), metadata, found.path)
    if found.applied_once and not staging.is_done(found.target):
        datums.write_directly(engine, entry)
        return WriteResult(datums.current_datum_properties(engine, found.datum_id), staged=False)
    stream_id, done = staging.stage_write(entry)
    try:
        if not done:
            return WriteResult(datums.current_datum_properties(engine, found.datum_id), staged=True)
        apply_target(engine, staging, found.target)
        return WriteResult(datums.current_datum_properties(engine, found.datum_id), staged=False)
    except Exception:
        _withdraw(staging, entry, stream_id)
        raise


def _withdraw(staging: Staging, entry: Entry, stream_id: str) -> None:
    """Take back a staged write whose request is answered with an error (the database failed).

    Left in the stream, the sweep or the target's next apply would apply it later, after the
    client was told it failed. Taken back by its own stream id, so an identical earlier write
    stays. Left open: an apply that reads it between the XADD and this XDEL (a sweep of the same
    target in that instant), and an error after the apply committed (then it stays applied).
    """
    try:
        staging.withdraw(entry.target, stream_id)
    except RedisError as exc:
        log.warning("could not take back the failed write on %s: %s", entry.target.key, exc)


# -- rollbacks: the reverts staged on each target's stream, then applied as API writes are ------


@dataclass
class RollbackResult:
    """What a rollback of `execution` did (or, `dry_run`, would do): per owner, the keys
    reverted (old → new) and those left as they are (conflicts). `id`: the rollback's own id,
    the one to roll back to undo it (None for a dry run, or when nothing was reverted)."""

    execution: str
    id: str | None
    dry_run: bool
    owners: list[OwnerPlan]


def roll_back(engine: Engine, staging: Staging, ident: str, *, dry_run: bool = False) -> RollbackResult:
    """Revert every property change `ident` (an execution, or a rollback) made, unless another
    source changed the key later (a conflict, left as it is). NotFound for an unknown id.

    Only applied changes are in the history: entries of `ident` still staged (a version still
    building, an execution not completed) are not touched and apply when their target does.
    Datum membership is not touched (a completed version's files are fixed).

    Each owner's reverts are one `revert` entry staged on its target's stream, so it is applied
    after every entry staged before it, under the watermark lock, like an API write; a key that
    such an entry changed meanwhile no longer holds what the plan saw and is left (reported as
    a conflict). An execution target retention took out of Redis is applied directly under its
    lock (a stream created again there would outlive retention), as API datum writes are.
    """
    with engine.connect() as conn:
        known = store_rollback.is_known(conn, ident)
        owners = store_rollback.plan(conn, ident)
    if not known and not staging.knows_execution(ident):
        raise NotFound(f"execution {ident}")
    if dry_run:
        return RollbackResult(ident, None, True, owners)
    rollback_id = new_id()
    source = Source("rollback", execution=ident, id=rollback_id)
    staged: list[tuple[Entry, str]] = []
    due: dict[str, Target] = {}
    try:
        for owner in owners:
            if not owner.reverts:
                continue
            metadata = {r.key: [r.old, r.new] for r in owner.reverts}
            entry = Entry(owner.target, "revert", source, metadata, owner.path)
            if owner.kind == "datum" and not staging.is_done(owner.target):
                datums.write_directly(engine, entry)
                continue
            stream_id, _ = staging.stage_write(entry)
            staged.append((entry, stream_id))
            due[owner.target.key] = owner.target
        apply_targets(engine, staging, list(due.values()))
    except Exception:
        for entry, stream_id in staged:
            _withdraw(staging, entry, stream_id)
        raise
    with engine.connect() as conn:
        done = store_rollback.made_by(conn, rollback_id)
    for owner in owners:
        # A key changed between the plan and the apply was left as it was (`_still_expected`).
        late = [r for r in owner.reverts if (owner.kind, owner.owner_id, r.key) not in done]
        owner.reverts = [r for r in owner.reverts if r not in late]
        reason = "changed while the rollback was applied, or refused by a definition"
        owner.conflicts += [Conflict(r.key, None, reason) for r in late]
    # Nothing changed, nothing to undo: no id (no history row would name it).
    return RollbackResult(ident, rollback_id if done else None, False, owners)


def rollback_json(result: RollbackResult) -> dict[str, Any]:
    """The API's and `sidecar rollback --json`'s answer (`api_models.Rollback`)."""
    owners = [
        {
            "kind": o.kind,
            "id": o.uid,
            "target": o.target.key,
            "path": o.path if o.kind == "datum" else None,
            "reverted": [{"key": r.key, "old": r.old, "new": r.new} for r in o.reverts],
            "conflicts": [{"key": c.key, "value": c.value, "reason": c.reason} for c in o.conflicts],
        }
        for o in result.owners
    ]
    return {
        "id": result.id,
        "execution": result.execution,
        "dry_run": result.dry_run,
        "reverted": sum(len(o.reverts) for o in result.owners),
        "conflicts": sum(len(o.conflicts) for o in result.owners),
        "owners": owners,
    }
