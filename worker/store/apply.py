"""The apply transaction: a target's staged entries, in order, plus its watermark, in one commit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

from ..merge import merge_into
from ..records import Entry, Source
from ..staging import Staging
from ..uris import Target
from .db import writer
from .index import bulk_insert, reindex
from .models import Dataset, DatasetVersion, Datum, PropertyChange, VersionFile, Watermark

_Row = TypeVar("_Row", Dataset, DatasetVersion, Datum)


@dataclass
class ApplyResult:
    """What one apply did."""

    target: str
    applied: int = 0
    watermark: str | None = None
    skipped: str = ""  # why nothing was done (e.g. the version is still building)


def apply_target(engine: Engine, staging: Staging, target: Target) -> ApplyResult:
    """Apply every staged entry of `target` after its watermark, in one transaction.

    Safe to run any number of times, concurrently too: the watermark row is locked first
    (SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE holds SQLite's write lock), and
    entries are read from Redis only after the lock is held, so a second apply of the same
    target waits, then sees the new watermark and finds nothing left to do.
    """
    result = ApplyResult(target.key)
    snapshot = staging.snapshot(target)  # before the lock: see Staging.snapshot
    with _sqlite_queue(engine), Session(writer(engine), expire_on_commit=False) as session, session.begin():
        mark = lock_watermark(session, target.key)
        result.watermark = mark.stream_id
        applier = Applier(session, datetime.now(UTC))
        if target.kind == "version" and not version_completed(session, staging, target, snapshot.done):
            # Register it, so the API can show a building version; its entries stay staged.
            applier.version(target)
            result.skipped = "version is still building"
            return result
        if target.kind == "version":
            applier.complete_version(target)
        for stream_id, entry in staging.read_after(target, mark.stream_id, snapshot):
            applier.apply(entry)
            mark.stream_id = stream_id
            result.applied += 1
        applier.flush()
        mark.applied_at = applier.now
        result.watermark = mark.stream_id
    # A version's flag may have been lost by Redis (AOF everysec); the database knows better, and
    # `finish` puts it back so that late lines for this version keep being applied by themselves.
    completed_at = applier.now.isoformat() if target.kind == "version" else None
    staging.finish(target, result.watermark, completed_at)
    return result


@contextmanager
def _sqlite_queue(engine: Engine) -> Iterator[None]:
    """On a SQLite file, queue the applies on a file lock (`<database>.apply-lock`) first.

    SQLite's busy handler polls with growing sleeps (up to 100 ms), so an apply waiting for the
    write lock wakes up long after it was released, and two workers applied slower than one;
    `flock` wakes the next waiter as soon as the holder is done. `BEGIN IMMEDIATE` stays the lock
    that counts (every other writer still takes only that); the file lock is released with its
    descriptor, so a killed worker cannot leave it held.
    """
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if fcntl is None or not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    fd = os.open(f"{database}.apply-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lock_watermark(session: Session, target: str) -> Watermark:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Watermark).values(target=target).on_conflict_do_nothing())
    return session.scalars(select(Watermark).where(Watermark.target == target).with_for_update()).one()


def version_completed(session: Session, staging: Staging, target: Target, done: bool = False) -> bool:
    """Whether a version is completed: `done` (its flag, as read before), Redis, or the database."""
    if done or staging.is_done(target):
        return True
    status = session.scalar(
        select(DatasetVersion.status)
        .join(Dataset)
        .where(Dataset.name == target.dataset, DatasetVersion.name == target.version)
    )
    return status == "completed"


_CHANGES = cast(Table, PropertyChange.__table__)


@dataclass
class _Working:
    """One owner's property set being folded, and the top-level keys that changed (in order)."""

    owner: Dataset | DatasetVersion | Datum
    properties: dict[str, Any]
    changed: dict[str, None] = field(default_factory=dict)
    was_empty: bool = False  # the stored set was empty: the owner has no index rows yet


@dataclass
class Applier:
    """Applies entries inside one session, caching the rows it touches."""

    session: Session
    now: datetime
    datasets: dict[str, Dataset] = field(default_factory=dict)
    versions: dict[tuple[str, str], DatasetVersion] = field(default_factory=dict)
    datums: dict[tuple[str, str], Datum] = field(default_factory=dict)
    # Working copies of the property sets being changed, folded in place and written back once
    # by `flush` (copying a 10,000-key set for each of 10,000 entries would be quadratic).
    working: dict[tuple[str, int], _Working] = field(default_factory=dict)
    # History rows, inserted at once by `flush` through Core: no ORM objects to autoflush before
    # each statement, no `RETURNING id` per row.
    changes: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, entry: Entry) -> None:
        target = entry.target
        if entry.op == "member":
            version = self.version(target)
            datum = self.datum(entry.source.execution, entry.path)
            if self.session.get(VersionFile, (version.id, datum.id)) is None:
                self.session.add(VersionFile(version_id=version.id, datum_id=datum.id))
        elif target.kind == "version":
            self.set(self.version(target), "version", entry)
        elif target.kind == "dataset":
            self.set(self.dataset(target.dataset), "dataset", entry)
        else:
            self.set(self.datum(target.execution, entry.path), "datum", entry)

    def complete_version(self, target: Target) -> None:
        version = self.version(target)
        if version.status != "completed":
            version.status = "completed"
            version.completed_at = self.now
            version.updated_at = self.now

    def set(self, owner: Dataset | DatasetVersion | Datum, kind: str, entry: Entry) -> None:
        key = (kind, owner.id)
        work = self.working.get(key)
        if work is None:
            stored = owner.properties or {}
            work = self.working[key] = _Working(owner, dict(stored), was_empty=not stored)
        changes = merge_into(work.properties, entry.metadata)
        if not changes:
            return
        owner.updated_at = self.now
        source = _source_json(entry.source)
        for c in changes:
            work.changed[c.key] = None
            self.changes.append(
                {
                    "owner_kind": kind,
                    "owner_id": owner.id,
                    "key": c.key,
                    "old": c.old,
                    "new": c.new,
                    "source": source,
                    "changed_at": self.now,
                }
            )

    def flush(self) -> None:
        """Write the folded property sets back, refresh the search index of the keys that changed
        (once per owner), and insert the history rows."""
        for (kind, owner_id), work in self.working.items():
            if not work.changed:
                continue  # every entry was a no-op: the stored set and its index are current
            work.owner.properties = work.properties
            if kind != "datum":
                keys, had_rows = work.changed.keys(), not work.was_empty
                reindex(self.session, kind, owner_id, work.properties, keys, had_rows=had_rows)
        self.working.clear()
        if self.changes:
            bulk_insert(self.session.connection(), _CHANGES, self.changes)
            self.changes = []

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            self.datasets[name] = self._get_or_create(
                Dataset,
                {"name": name},
                {"properties": {}, "created_at": self.now, "updated_at": self.now},
            )
        return self.datasets[name]

    def version(self, target: Target) -> DatasetVersion:
        key = (target.dataset, target.version)
        if key not in self.versions:
            dataset = self.dataset(target.dataset)
            self.versions[key] = self._get_or_create(
                DatasetVersion,
                {"dataset_id": dataset.id, "name": target.version},
                {
                    "status": "building",
                    "properties": {},
                    "created_at": self.now,
                    "updated_at": self.now,
                },
            )
        return self.versions[key]

    def datum(self, execution: str, path: str) -> Datum:
        key = (execution, path)
        if key not in self.datums:
            self.datums[key] = self._get_or_create(
                Datum,
                {"execution": execution, "path": path},
                {"properties": {}, "updated_at": self.now},
            )
        return self.datums[key]

    def _get_or_create(self, model: type[_Row], natural: dict[str, Any], defaults: dict[str, Any]) -> _Row:
        # INSERT .. ON CONFLICT DO NOTHING, then SELECT: two applies of different targets that
        # create the same dataset or datum at once both succeed (the second waits for the first
        # on PostgreSQL's unique index) instead of one failing with an IntegrityError.
        # RETURNING gives the new row without another SELECT. It gives nothing when another
        # apply created the row since our SELECT; the second SELECT then finds theirs.
        where = [getattr(model, k) == v for k, v in natural.items()]
        row = self.session.scalar(select(model).where(*where))
        if row is None:
            insert = pg_insert if self.session.get_bind().dialect.name == "postgresql" else sqlite_insert
            statement = insert(model).values(**natural, **defaults).on_conflict_do_nothing()
            row = self.session.scalar(statement.returning(model))
        if row is None:
            row = self.session.scalar(select(model).where(*where))
        assert row is not None
        return row


def _source_json(source: Source) -> dict[str, Any]:
    if source.origin == "sidecar":
        return {
            "origin": "sidecar",
            "execution": source.execution,
            "file": source.file,
            "line": source.line,
            "offset": source.offset,
        }
    return {"origin": source.origin}
