"""The apply transaction: a target's staged entries, in order, plus its watermark, in one commit."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ..merge import merge_into
from ..records import Entry, Source
from ..staging import Staging
from ..uris import Target
from .db import writer
from .index import reindex
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
    with Session(writer(engine), expire_on_commit=False) as session, session.begin():
        mark = lock_watermark(session, target.key)
        result.watermark = mark.stream_id
        applier = Applier(session, datetime.now(UTC))
        if target.kind == "version" and not version_completed(session, staging, target):
            # Register it, so the API can show a building version; its entries stay staged.
            applier.version(target)
            result.skipped = "version is still building"
            return result
        if target.kind == "version":
            applier.complete_version(target)
        for stream_id, entry in staging.read_after(target, mark.stream_id):
            applier.apply(entry)
            mark.stream_id = stream_id
            result.applied += 1
        applier.flush()
        mark.applied_at = applier.now
        result.watermark = mark.stream_id
    if target.kind == "version":
        # Redis may have lost the flag (AOF everysec); the database knows better. Put it back so
        # that late lines for this version keep being applied by themselves.
        staging.redis.set(staging.keys.done(target), applier.now.isoformat(), nx=True)
    staging.finish(target, result.watermark)
    return result


def lock_watermark(session: Session, target: str) -> Watermark:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(Watermark).values(target=target).on_conflict_do_nothing())
    return session.scalars(select(Watermark).where(Watermark.target == target).with_for_update()).one()


def version_completed(session: Session, staging: Staging, target: Target) -> bool:
    if staging.is_done(target):
        return True
    status = session.scalar(
        select(DatasetVersion.status)
        .join(Dataset)
        .where(Dataset.name == target.dataset, DatasetVersion.name == target.version)
    )
    return status == "completed"


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
    working: dict[tuple[str, int], tuple[Dataset | DatasetVersion | Datum, dict[str, Any]]] = field(
        default_factory=dict
    )

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
        if key not in self.working:
            self.working[key] = (owner, dict(owner.properties or {}))
        changes = merge_into(self.working[key][1], entry.metadata)
        if not changes:
            return
        owner.updated_at = self.now
        source = _source_json(entry.source)
        self.session.add_all(
            PropertyChange(
                owner_kind=kind,
                owner_id=owner.id,
                key=c.key,
                old=c.old,
                new=c.new,
                source=source,
                changed_at=self.now,
            )
            for c in changes
        )

    def flush(self) -> None:
        """Write the folded property sets back, and refresh the search index once per owner."""
        for (kind, owner_id), (owner, properties) in self.working.items():
            owner.properties = properties
            if kind != "datum":
                reindex(self.session, kind, owner_id, properties)
        self.working.clear()

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
        where = [getattr(model, k) == v for k, v in natural.items()]
        row = self.session.scalar(select(model).where(*where))
        if row is None:
            insert = pg_insert if self.session.get_bind().dialect.name == "postgresql" else sqlite_insert
            self.session.execute(insert(model).values(**natural, **defaults).on_conflict_do_nothing())
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
