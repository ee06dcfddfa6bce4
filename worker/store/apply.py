"""The apply's SQL work: a target's staged entries, in order, plus its watermark, in one commit.

The entries come already read from staging (`worker/applying.py` reads them, opens the
transaction, and finishes in Redis after the commit); nothing here speaks to Redis.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, and_, bindparam, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

from ..datum_keys import ALIAS_KEY
from ..definitions import Definition, split
from ..membership import Spec, file_list, fold_spec
from ..merge import Change, merge_into, same_json
from ..notifications import Subscriber
from ..records import Entry, Reject, Source
from ..uris import Target, parse_uri
from . import aliases, definitions, outbox, subscriptions
from .datum_aliases import point_aliases
from .index import bulk_insert, index_rows, reindex
from .models import (
    BulkEdit,
    Dataset,
    DatasetVersion,
    Datum,
    PropertyChange,
    PropertyIndex,
    VersionFile,
    Watermark,
)

log = logging.getLogger(__name__)


@contextmanager
def sqlite_queue(engine: Engine, *, urgent: bool = False) -> Iterator[None]:
    """On a SQLite file, queue the applies on a file lock (`<database>.apply-lock`) first.

    SQLite's busy handler polls with growing sleeps (up to 100 ms), so an apply waiting for the
    write lock wakes up long after it was released, and two workers applied slower than one;
    `flock` wakes the next waiter as soon as the holder is done. `BEGIN IMMEDIATE` stays the lock
    that counts (every other writer still takes only that); the file lock is released with its
    descriptor, so a killed worker cannot leave it held.

    `flock` is not first come, first served: every waiter wakes and one wins. During a bulk load
    two threads take the lock back to back for batches of ~0.3 s, and a late line's apply lost
    that race for 0.5-1.5 s. So an `urgent` apply (one target) holds `<database>.urgent-lock`
    shared while it waits and runs, and every other apply first waits until no urgent one holds
    it: a late line waits for at most the batch already running. (Urgent applies are small; a
    steady stream of them can hold batches back, never lose them.)
    """
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if fcntl is None or not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    gate = os.open(f"{database}.urgent-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if urgent:
            fcntl.flock(gate, fcntl.LOCK_SH)
        else:
            fcntl.flock(gate, fcntl.LOCK_EX)  # no urgent apply waiting or running ...
            fcntl.flock(gate, fcntl.LOCK_UN)  # ... and none kept out for the batch's length
        fd = os.open(f"{database}.apply-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
    finally:
        os.close(gate)


def lock_watermark(conn: Connection, target: str) -> str | None:
    """The target's watermark (None: nothing applied yet), locked until the transaction ends."""
    return lock_watermarks(conn, [target])[target]


def save_watermark(conn: Connection, target: str, stream_id: str | None, now: datetime) -> None:
    save_watermarks(conn, {target: (stream_id, now)})


def lock_watermarks(conn: Connection, targets: list[str]) -> dict[str, str | None]:
    """Each target's watermark (None: nothing applied yet), every row locked until the
    transaction ends, in two statements (on PostgreSQL the row is the lock: it is made sure to
    exist, then locked).

    The rows are locked in target order (`targets` sorted, `ORDER BY target FOR UPDATE`), so two
    batches sharing targets wait for each other instead of deadlocking. On SQLite `BEGIN
    IMMEDIATE` already holds the whole database.
    """
    keys = sorted(set(targets))
    marks: dict[str, str | None] = dict.fromkeys(keys)
    if conn.dialect.name != "sqlite":
        conn.execute(_statements(conn).insert_mark, [{"target": t} for t in keys])
    statement = _LOCK_MARKS if conn.dialect.name != "sqlite" else _SELECT_MARKS
    for start in range(0, len(keys), _IN_CHUNK):
        for target, stream_id in conn.execute(statement, {"targets": keys[start : start + _IN_CHUNK]}):
            marks[target] = stream_id
    return marks


def save_watermarks(conn: Connection, marks: Mapping[str, tuple[str | None, datetime]]) -> None:
    """Save each target's watermark, (stream id, applied at) by target, in one statement."""
    if marks:
        rows = [{"target": t, "stream_id": m, "applied_at": at} for t, (m, at) in sorted(marks.items())]
        conn.execute(_statements(conn).save_mark, rows)


def version_is_completed(conn: Connection, target: Target) -> bool:
    """Whether the database has the version `target` completed."""
    row = conn.execute(_SELECT_VERSION, {"dataset": target.dataset, "name": target.version}).first()
    return row is not None and row.status == "completed"


def apply_entries(
    applier: Applier, target: Target, mark: str | None, entries: Iterable[tuple[str, Entry]]
) -> tuple[int, str | None]:
    """The SQL work of one target's apply, in the caller's transaction with the target's
    watermark locked (`lock_watermark`): a version completes, then `entries` (as read from
    staging, after `mark`, in stream order) are folded. Returns (entries applied, the new
    watermark); `Applier.flush` and `save_watermark` write it all."""
    if target.kind == "version":
        applier.complete_version(target)
    applied = 0
    for stream_id, entry in entries:
        applier.apply(entry)
        mark = stream_id
        applied += 1
    return applied, mark


@dataclass
class Owner:
    """A dataset, version or datum row: as much of it as an apply reads and writes."""

    kind: str  # "dataset", "version" or "datum" (its table, and its owner_kind in history and index)
    id: int
    properties: dict[str, Any]
    status: str | None = None  # versions only
    updates: dict[str, Any] = field(default_factory=dict)  # columns `flush` writes


@dataclass
class _Working:
    """One owner's property set being folded, and the top-level keys that changed (in order)."""

    owner: Owner
    properties: dict[str, Any]
    changed: dict[str, None] = field(default_factory=dict)
    was_empty: bool = False  # the stored set was empty: the owner has no index rows yet


@dataclass
class Applier:
    """Applies entries inside one transaction, caching the rows it touches.

    Plain Core statements, built once: SQLAlchemy's ORM cost ~0.3 ms of Python per statement on
    the machines we measure, and an apply runs about ten of them under the write lock.
    """

    conn: Connection
    now: datetime
    owners: dict[tuple[str, ...], Owner] = field(default_factory=dict)
    # Working copies of the property sets being changed, folded in place and written back once
    # by `flush` (copying a 10,000-key set for each of 10,000 entries would be quadratic).
    working: dict[tuple[str, int], _Working] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)  # history rows, inserted by `flush`
    members: dict[tuple[int, int], None] = field(default_factory=dict)  # version files, likewise
    # Datum aliases claimed by `valohai.alias` (name -> datum id, source; the last claim wins).
    datum_aliases: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    # Member entries, settled by `flush`: the files of a version completing in this transaction,
    # or late files of a completed one (see `settle`).
    joining: dict[Target, list[Entry]] = field(default_factory=dict)
    completing: dict[Target, None] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)  # recorded by the caller after the commit
    absent: dict[tuple[str, ...], None] = field(default_factory=dict)  # owners `prefetch` found missing
    # Property definitions, read (from the process cache) at the first `set`: store/definitions.py.
    defined: Mapping[str, Definition] | None = None
    # Bulk edits' filters by id, read once per apply for their history rows' source.
    bulk_filters: dict[str, str] = field(default_factory=dict)
    # Subscriptions to change notifications, read at the first `write` with something to tell
    # (store/subscriptions.py); empty, as it usually is, and nothing more is written.
    subscribers: list[Subscriber] | None = None

    def apply(self, entry: Entry) -> None:
        target = entry.target
        if entry.op == "member":
            self.joining.setdefault(target, []).append(entry)
            return
        if target.kind == "version":
            owner = self.version(target)
        elif target.kind == "dataset":
            owner = self.dataset(target.dataset)
        else:
            owner = self.datum(target.execution, entry.path)
        self.set(owner, self._still_expected(owner, entry) if entry.op == "revert" else entry)

    def _still_expected(self, owner: Owner, entry: Entry) -> Entry:
        """A rollback's revert as a plain `set` of the keys that still hold what the rollback
        saw. Race: a line or write applied between the rollback's reading and this apply (under
        the watermark lock, in stream order) changed the key; it is then left as that made it."""
        work = self.working.get((owner.kind, owner.id))
        current = work.properties if work is not None else owner.properties
        metadata = {
            key: value
            for key, (expected, value) in entry.metadata.items()
            if same_json(current.get(key), expected)
        }
        return Entry(entry.target, "set", entry.source, metadata, entry.path)

    def complete_version(self, target: Target) -> None:
        version = self.version(target)
        if version.status != "completed":
            version.status = "completed"
            version.updates.update(status="completed", completed_at=self.now, updated_at=self.now)
            self.completing[target] = None

    def set(self, owner: Owner, entry: Entry) -> None:
        key = (owner.kind, owner.id)
        work = self.working.get(key)
        if work is None:
            work = self.working[key] = _Working(owner, dict(owner.properties), was_empty=not owner.properties)
        metadata, broken = split(self.definitions(), owner.kind, entry.metadata)
        for violation in broken:  # a `reject` definition drops that key's change, not the entry's
            self.reject(entry, violation.reason())
        changes = merge_into(work.properties, metadata)
        if owner.kind == "datum" and ALIAS_KEY in metadata:
            self._claim_alias(owner, entry, changes)
        if not changes:
            return
        owner.updates["updated_at"] = self.now
        source = self._history_source(entry.source)
        made_by = made_by_of(entry.source)
        for c in changes:
            work.changed[c.key] = None
            self.changes.append(
                {
                    "owner_kind": owner.kind,
                    "owner_id": owner.id,
                    "key": c.key,
                    "old": c.old,
                    "new": c.new,
                    "source": source,
                    "changed_at": self.now,
                    "made_by": made_by,
                }
            )

    def _history_source(self, source: Source) -> dict[str, Any]:
        """A history row's `source`; a bulk edit's names its filter, read from its row (a bulk
        edit's entries carry only its id, so that the filter is not copied into each one)."""
        if source.origin != "bulk":
            return _source_json(source)
        found = self.bulk_filters.get(source.id)
        if found is None:
            found = self.bulk_filters[source.id] = (
                self.conn.execute(_SELECT_BULK_FILTER, {"id": source.id}).scalar() or ""
            )
        return {"origin": "bulk", "id": source.id, "filter": found}

    def _claim_alias(self, owner: Owner, entry: Entry, changes: list[Change]) -> None:
        """`valohai.alias` set on a datum points the alias at it (moved at `flush`). A line read
        again that sets the alias the datum already had moves nothing (the alias may have moved
        on to another datum since); an API write points it whatever the datum held."""
        name = entry.metadata[ALIAS_KEY]
        if not isinstance(name, str):
            return  # null: the key is removed; the alias stays where it points
        if entry.source.origin == "api" or any(c.key == ALIAS_KEY for c in changes):
            self.datum_aliases[name] = (owner.id, _source_json(entry.source))

    def flush(self) -> None:
        """Settle the member entries, then `write` everything."""
        self.settle()
        self.write()

    def write(self) -> None:
        """Write the folded property sets and changed columns back, refresh the search index of
        the keys that changed (once per owner), and insert the history rows and version files.

        One statement per table for all the owners touched (executemany, or COPY for the index
        and history on PostgreSQL), however many targets the transaction applies. May be called
        more than once in a transaction: what is written is forgotten, and the next call writes
        what changed since."""
        fresh: list[dict[str, Any]] = []  # index rows of owners that had none yet
        for work in self.working.values():
            if not work.changed:
                continue  # every entry was a no-op: the stored set and its index are current
            owner = work.owner
            owner.properties = owner.updates["properties"] = work.properties
            if work.was_empty:
                # Nothing to delete: gathered, and inserted in one go below (an execution's
                # completion creates thousands of datums; one COPY each cost a third of its apply).
                fresh += index_rows(owner.kind, owner.id, work.properties)
            else:
                reindex(self.conn, owner.kind, owner.id, work.properties, work.changed.keys())
        bulk_insert(self.conn, _INDEX, fresh)
        self.working.clear()
        self._notify()  # before the updates are written: a completion is its `status` update
        # Rows of one table with the same columns changed go in one executemany.
        updates: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
        for owner in self.owners.values():
            if owner.updates:
                found = self.definitions()
                owner.updates["violations"] = definitions.owner_violations(
                    found, owner.kind, owner.properties, owner.status
                )
                columns = (owner.kind, tuple(sorted(owner.updates)))
                updates.setdefault(columns, []).append({"owner": owner.id, **owner.updates})
                owner.updates = {}
        for (kind, _), rows in updates.items():
            self.conn.execute(_UPDATE[kind], rows)
        if self.members:
            rows = [{"version_id": v, "datum_id": d} for v, d in self.members]
            self.conn.execute(_statements(self.conn).insert_member, rows)
            self.members = {}
        if self.changes:
            bulk_insert(self.conn, _CHANGES, self.changes)
            self.changes = []
        if self.datum_aliases:
            point_aliases(self.conn, self.datum_aliases, self.now)
            self.datum_aliases = {}

    def _notify(self) -> None:
        """Change notifications of what this `write` writes, as outbox rows in this same
        transaction (store/outbox.py): they exist if and only if the change commits."""
        completed = [o for o in self.owners.values() if o.updates.get("status") == "completed"]
        if not self.changes and not completed:
            return
        if self.subscribers is None:
            self.subscribers = subscriptions.active(self.conn)
        if self.subscribers:
            outbox.record_apply(self, self.subscribers, completed)

    def definitions(self) -> Mapping[str, Definition]:
        if self.defined is None:
            self.defined = definitions.load(self.conn)
        return self.defined

    def settle(self) -> None:
        """The member entries folded so far: the files of versions completing, late files.

        A batched apply settles after each target, so a target's `from` (resolved by SQL) sees
        what the targets before it in the batch did, as if each had been its own apply."""
        for target in self.completing:
            self._complete_members(target, self.joining.pop(target, []))
        self.completing.clear()
        for target, entries in self.joining.items():
            self._late_members(target, entries)
        self.joining.clear()

    def _complete_members(self, target: Target, entries: list[Entry]) -> None:
        """The version completes in this transaction: its files are the base's (`from`, resolved
        now) minus `exclude`, plus its own; its aliases move to it."""
        version = self.version(target)
        spec, conflicts = fold_spec(entries)
        for entry, reason in conflicts:
            self.reject(entry, reason)
        if spec.base is not None:
            # The base may be a version completed earlier in this transaction (a batch): write
            # what is folded so far, so that resolving it in SQL sees its status and files. All
            # but this version's own completion, which its apply alone would not have written
            # yet either (`latest` must not resolve to the version completing).
            completion, version.updates = version.updates, {}
            self.write()
            version.updates = {**version.updates, **completion}
        base, previous, problem = self._base(version, spec)
        if problem and spec.base_entry is not None:
            self.reject(spec.base_entry, problem)
        own = [(e.path, self.datum(e.source.execution, e.path).id) for e in entries]
        for datum_id in file_list(base, spec, own).values():
            self.members[(version.id, datum_id)] = None
        builders = (e.source.execution for e in entries)
        resolved = spec.base if previous is not None else None
        version.updates.update(
            spec=spec.to_json(builders, resolved), previous_version_id=previous, spec_problem=problem
        )
        dataset_id = self.dataset(target.dataset).id
        # In name order: two completions moving the same aliases lock their rows in one order.
        for name, entry in sorted(spec.aliases.items()):
            if aliases.version_name_taken(self.conn, dataset_id, name):
                self.reject(entry, f"alias {name!r} of dataset://{target.dataset} is the name of a version")
                continue
            aliases.move(self.conn, dataset_id, name, version.id, _source_json(entry.source), self.now)

    def _base(self, version: Owner, spec: Spec) -> tuple[dict[str, int] | None, int | None, str | None]:
        """(the base's files by name, its id, why there is none) for `spec.base`, resolved now."""
        if spec.base is None:
            return None, None, None
        dataset, name = parse_uri(spec.base, allow_latest=True)
        row = aliases.resolve(self.conn, dataset, name or "")
        if row is None:
            return (
                None,
                None,
                f"from {spec.base!r} names no version that exists; completed with its own files",
            )
        if row.id == version.id or row.status != "completed":
            problem = (
                f"from {spec.base!r} names a version that is not completed; completed with its own files"
            )
            return None, None, problem
        files = self.conn.execute(_BASE_FILES, {"version": row.id}).all()
        return {path: datum_id for datum_id, path in files}, row.id, None

    def _late_members(self, target: Target, entries: list[Entry]) -> None:
        """Member entries applied after the version completed. Its file list is fixed, except for
        its builders (executions with a file in it at completion): a watcher may read the rest of
        such an execution's lines after `execution_completed` completed the version."""
        version = self.version(target)
        row = self.conn.execute(_SELECT_SPEC, {"owner": version.id}).one()
        spec = row.spec or {}
        if "builders" in spec:
            builders = set(spec["builders"])
        else:  # completed before membership specs existed: its files were its own
            builders = set(self.conn.scalars(_FILE_EXECUTIONS, {"version": version.id}))
        for entry in entries:
            execution = entry.source.execution
            if execution not in builders:
                self.reject(
                    entry,
                    f"{target.key} is completed and its files cannot change "
                    f"(execution {execution} had no file in it when it completed)",
                )
                continue
            if "from" in entry.metadata and entry.metadata["from"] != spec.get(
                "from", entry.metadata["from"]
            ):
                self.reject(
                    entry, f"{target.key} completed from {spec.get('from')!r}; this item's from is ignored"
                )
            datum = self.datum(execution, entry.path)
            # A version never holds two files of one name: this one replaces the other.
            names = {"version": version.id, "path": entry.path}
            for other in self.conn.scalars(_FILES_NAMED, names):
                if other != datum.id:
                    self.conn.execute(_DELETE_FILE, {"version": version.id, "datum": other})
            self.conn.execute(
                _statements(self.conn).insert_member, {"version_id": version.id, "datum_id": datum.id}
            )

    def reject(self, entry: Entry, reason: str) -> None:
        source = entry.source
        self.rejects.append(
            Reject(source.file, source.line, source.offset, reason, source.execution, self.now.isoformat())
        )

    def dataset(self, name: str) -> Owner:
        key = ("dataset", name)
        if key not in self.owners:
            row = self._get_or_create(_DATASETS, {"name": name}, self._defaults("dataset"))
            self.owners[key] = Owner("dataset", row.id, row.properties or {})
        return self.owners[key]

    def version(self, target: Target) -> Owner:
        key = ("version", target.dataset, target.version)
        if key not in self.owners:
            # A version is usually registered (building) before it completes: one statement.
            names = {"dataset": target.dataset, "name": target.version}
            absent = key in self.absent  # `prefetch` found none: straight to the INSERT
            row: Any = None if absent else self.conn.execute(_SELECT_VERSION, names).first()
            if row is None:
                row = self._get_or_create(
                    _VERSIONS,
                    {"dataset_id": self.dataset(target.dataset).id, "name": target.version},
                    self._defaults("version"),
                    absent=absent,
                )
            self.owners[key] = Owner("version", row.id, row.properties or {}, status=row.status)
        return self.owners[key]

    def datum(self, execution: str, path: str) -> Owner:
        key = ("datum", execution, path)
        if key not in self.owners:
            natural = {"execution": execution, "path": path}
            # `prefetch` found none: straight to the INSERT (which still tolerates a racing one).
            row = self._get_or_create(_DATUMS, natural, self._defaults("datum"), absent=key in self.absent)
            self.owners[key] = Owner("datum", row.id, row.properties or {})
        return self.owners[key]

    def prefetch(self, work: list[tuple[Target, list[Entry], bool]], *, whole: bool = False) -> None:
        """The owner rows a batch will touch, a few statements per table instead of one or two
        per row. `work`: each target (sorted), the entries after its watermark that its snapshot
        holds, and whether its completion flag is set.

        Only rows that no apply of the batch looks for, and that the applies one by one would
        create anyway, are created here: the datasets of the version targets and of the dataset
        targets with entries, and the datums of the member entries of a version that completes
        now (its every member entry names a file of it). Versions too (every version target of
        the batch registers its row, building or not), but only when every stream is read whole
        and no member entry names a `from` or an alias: those are resolved in SQL, where a
        later target's version must be missing, as it would be one by one. Nor are other datums
        created (a late member entry may still be refused without creating its datum). A row
        found missing is created at its first use by a single INSERT (one round trip per
        version: 1,000 of them were a third of a PostgreSQL batch's statement time).
        """
        datasets = {
            t.dataset for t, entries, _ in work if t.kind == "version" or (t.kind == "dataset" and entries)
        }
        self._fetch(_DATASETS, [{"name": n} for n in sorted(datasets)], create=True)
        versions = [
            {"dataset_id": self.dataset(t.dataset).id, "name": t.version}
            for t, _, _ in work
            if t.kind == "version"
        ]
        self._fetch(_VERSIONS, versions, create=whole and not _resolves_in_sql(work))
        created: dict[tuple[str, str], None] = {}
        for target, entries, done in work:
            if target.kind != "version" or not done:
                continue
            found = self.owners.get(("version", target.dataset, target.version))
            if found is None or found.status != "completed":
                created.update(((e.source.execution, e.path), None) for e in entries if e.op == "member")
        self._fetch(_DATUMS, [{"execution": e, "path": p} for e, p in created], create=True)
        self._fetch(_DATUMS, _datums_of(e for _, entries, _ in work for e in entries), create=False)

    def prefetching(self, entries: Iterable[tuple[str, Entry]]) -> Iterator[tuple[str, Entry]]:
        """`entries` as they are, with the datums they name read ahead a chunk at a time (the
        part of a long stream that no snapshot held)."""
        chunk: list[tuple[str, Entry]] = []
        for item in entries:
            chunk.append(item)
            if len(chunk) == _IN_CHUNK:
                self._fetch(_DATUMS, _datums_of(e for _, e in chunk), create=False)
                yield from chunk
                chunk = []
        self._fetch(_DATUMS, _datums_of(e for _, e in chunk), create=False)
        yield from chunk

    def _fetch(self, table: Table, naturals: list[dict[str, Any]], *, create: bool) -> None:
        """Put the rows of `naturals` (natural keys) in the cache, read in chunks; the missing
        ones created in one executemany (`create`), or else remembered as absent."""
        if not naturals:
            return
        kind = _KINDS[table.name]
        datasets = (
            {owner.id: key[1] for key, owner in self.owners.items() if key[0] == "dataset"}
            if kind == "version"
            else {}
        )
        wanted = {_cache_key(kind, n, datasets): n for n in naturals}
        missing = self._read(table, kind, {k: n for k, n in wanted.items() if k not in self.owners}, datasets)
        if missing and create:
            defaults = self._defaults(kind)
            rows = [{**n, **defaults} for n in missing.values()]
            self.conn.execute(_statements(self.conn).create_rows[table.name], rows)
            missing = self._read(table, kind, missing, datasets)
            assert not missing, f"{kind} rows neither found nor created: {list(missing)[:3]}"
        self.absent.update(dict.fromkeys(missing))

    def _read(
        self, table: Table, kind: str, wanted: dict[tuple[str, ...], dict[str, Any]], datasets: dict[int, str]
    ) -> dict[tuple[str, ...], dict[str, Any]]:
        """Cache the rows of `wanted` that exist; the rest is returned."""
        left = dict(wanted)
        items = list(wanted.values())
        for start in range(0, len(items), _IN_CHUNK):
            for row in self.conn.execute(_fetch_statement(table, items[start : start + _IN_CHUNK])):
                key = _cache_key(kind, dict(row._mapping), datasets)
                if left.pop(key, None) is not None:
                    status = row.status if kind == "version" else None
                    self.owners[key] = Owner(kind, row.id, row.properties or {}, status=status)
        return left

    def _defaults(self, kind: str) -> dict[str, Any]:
        """The columns of a row this apply creates. A dataset or datum is checked whenever it
        exists, so one created with no properties (a version's dataset, a datum named only by a
        member line) already misses its `required` keys, as the re-check would find; a new
        version is building, and building versions have none."""
        out: dict[str, Any] = {"properties": {}, "created_at": self.now, "updated_at": self.now}
        if kind == "version":
            out["status"] = "building"
        else:
            out["violations"] = definitions.owner_violations(self.definitions(), kind, {}, None)
        return out

    def _get_or_create(
        self, table: Table, natural: dict[str, Any], defaults: dict[str, Any], *, absent: bool = False
    ) -> Any:
        # SELECT, then INSERT .. ON CONFLICT DO NOTHING RETURNING: two applies of different
        # targets that create the same dataset or datum at once both succeed (the second waits
        # for the first on PostgreSQL's unique index) instead of one failing with an
        # IntegrityError. The INSERT returns nothing when another apply created the row since
        # our SELECT; the second SELECT then finds theirs.
        statements = _statements(self.conn)
        row = None if absent else self.conn.execute(statements.select_row[table.name], natural).first()
        if row is None:
            row = self.conn.execute(statements.insert_row[table.name], {**natural, **defaults}).first()
        if row is None:
            row = self.conn.execute(statements.select_row[table.name], natural).first()
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
    if source.origin == "rollback":
        return {"origin": "rollback", "id": source.id, "execution": source.execution}
    return {"origin": source.origin}


def made_by_of(source: Source) -> str | None:
    """What a history row names as the maker of its change (`property_changes.made_by`): the
    execution of a sidecar line, the id of a rollback or of a bulk edit; None for API and
    platform writes."""
    if source.origin == "sidecar":
        return source.execution or None
    if source.origin in ("rollback", "bulk"):
        return source.id
    return None


# -- the statements, built once ------------------------------------------------------------------

_DATASETS = cast(Table, Dataset.__table__)
_VERSIONS = cast(Table, DatasetVersion.__table__)
_DATUMS = cast(Table, Datum.__table__)
_FILES = cast(Table, VersionFile.__table__)
_MARKS = cast(Table, Watermark.__table__)
_CHANGES = cast(Table, PropertyChange.__table__)
_INDEX = cast(Table, PropertyIndex.__table__)
_BULK = cast(Table, BulkEdit.__table__)
_SELECT_BULK_FILTER = select(_BULK.c.filter).where(_BULK.c.id == bindparam("id"))

_SELECT_MARKS = (
    select(_MARKS.c.target, _MARKS.c.stream_id)
    .where(_MARKS.c.target.in_(bindparam("targets", expanding=True)))
    .order_by(_MARKS.c.target)
)
_LOCK_MARKS = _SELECT_MARKS.with_for_update()
_IN_CHUNK = 500  # bound parameters per IN (SQLite's limit is 32,766; PostgreSQL's 65,535)
_SELECT_VERSION = (
    select(_VERSIONS.c.id, _VERSIONS.c.properties, _VERSIONS.c.status)
    .join(_DATASETS, _DATASETS.c.id == _VERSIONS.c.dataset_id)
    .where(_DATASETS.c.name == bindparam("dataset"), _VERSIONS.c.name == bindparam("name"))
)
_SELECT_SPEC = select(_VERSIONS.c.spec).where(_VERSIONS.c.id == bindparam("owner"))
_BASE_FILES = (
    select(_DATUMS.c.id, _DATUMS.c.path)
    .join(_FILES, _FILES.c.datum_id == _DATUMS.c.id)
    .where(_FILES.c.version_id == bindparam("version"))
)
_FILES_NAMED = (
    select(_DATUMS.c.id)
    .join(_FILES, _FILES.c.datum_id == _DATUMS.c.id)
    .where(_FILES.c.version_id == bindparam("version"), _DATUMS.c.path == bindparam("path"))
)
_FILE_EXECUTIONS = (
    select(_DATUMS.c.execution)
    .distinct()
    .join(_FILES, _FILES.c.datum_id == _DATUMS.c.id)
    .where(_FILES.c.version_id == bindparam("version"))
)
_DELETE_FILE = delete(_FILES).where(
    _FILES.c.version_id == bindparam("version"), _FILES.c.datum_id == bindparam("datum")
)
# No .values(): the SET clause is the columns given at execution.
_UPDATE = {
    kind: update(table).where(table.c.id == bindparam("owner"))
    for kind, table in (("dataset", _DATASETS), ("version", _VERSIONS), ("datum", _DATUMS))
}
_NATURAL = {
    "datasets": ("name",),
    "dataset_versions": ("dataset_id", "name"),
    "datums": ("execution", "path"),
}


_KINDS = {"datasets": "dataset", "dataset_versions": "version", "datums": "datum"}


def _resolves_in_sql(work: list[tuple[Target, list[Entry], bool]]) -> bool:
    """Whether a member entry of the batch names a base (`from`) or aliases to move: both are
    looked up among the versions in SQL while the batch runs."""
    return any(
        e.op == "member" and ("from" in e.metadata or "targeting_aliases" in e.metadata)
        for _, entries, _ in work
        for e in entries
    )


def _datums_of(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """The natural keys of the datums `entries` name (a member entry's, a datum entry's)."""
    found: dict[tuple[str, str], None] = {}
    for entry in entries:
        if entry.op == "member" and entry.source.execution:
            found[(entry.source.execution, entry.path)] = None
        elif entry.target.kind == "execution":
            found[(entry.target.execution, entry.path)] = None
    return [{"execution": e, "path": p} for e, p in found]


def _cache_key(kind: str, natural: dict[str, Any], datasets: dict[int, str]) -> tuple[str, ...]:
    """An owner's key in `Applier.owners` from its natural key (`datasets`: names by id)."""
    if kind == "dataset":
        return ("dataset", natural["name"])
    if kind == "version":
        return ("version", datasets[natural["dataset_id"]], natural["name"])
    return ("datum", natural["execution"], natural["path"])


def _fetch_statement(table: Table, naturals: list[dict[str, Any]]) -> Any:
    """The rows of `naturals` (all with the same natural-key columns) in one SELECT."""
    names = _NATURAL[table.name]
    columns = [table.c.id, table.c.properties, *(table.c[n] for n in names)]
    if table is _VERSIONS:
        columns.append(table.c.status)
    if len(names) == 1:
        return select(*columns).where(table.c[names[0]].in_([n[names[0]] for n in naturals]))
    # `first = v AND second IN (...)` per value of the first column, not `(first, second) IN
    # (pairs)`: for the pairs, PostgreSQL read every row of the first column's value and hashed
    # them (all 100,000 datums of one execution, for each batch of 500: the batches of a
    # 100,000-version load got slower with every one), where this is one lookup per pair in the
    # unique (first, second) index on both databases.
    first, second = names
    groups: dict[Any, list[Any]] = {}
    for n in naturals:
        groups.setdefault(n[first], []).append(n[second])
    return select(*columns).where(
        or_(*(and_(table.c[first] == v, table.c[second].in_(values)) for v, values in groups.items()))
    )


@dataclass(frozen=True)
class _Statements:
    """The statements whose SQL depends on the dialect (ON CONFLICT)."""

    select_row: dict[str, Any]
    insert_row: dict[str, Any]
    insert_mark: Any
    save_mark: Any
    insert_member: Any
    create_rows: dict[str, Any]  # INSERT .. ON CONFLICT DO NOTHING, for an executemany


def _build(dialect: str) -> _Statements:
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    select_row, insert_row = {}, {}
    for table in (_DATASETS, _VERSIONS, _DATUMS):
        natural = _NATURAL[table.name]
        columns = [table.c.id, table.c.properties] + ([table.c.status] if table is _VERSIONS else [])
        select_row[table.name] = select(*columns).where(*(table.c[n] == bindparam(n) for n in natural))
        insert_row[table.name] = insert(table).on_conflict_do_nothing().returning(*columns)
    save = insert(_MARKS)
    save = save.on_conflict_do_update(
        index_elements=[_MARKS.c.target],
        set_={"stream_id": save.excluded.stream_id, "applied_at": save.excluded.applied_at},
    )
    return _Statements(
        select_row=select_row,
        insert_row=insert_row,
        insert_mark=insert(_MARKS).on_conflict_do_nothing(),
        save_mark=save,
        insert_member=insert(_FILES).on_conflict_do_nothing(),
        create_rows={t.name: insert(t).on_conflict_do_nothing() for t in (_DATASETS, _VERSIONS, _DATUMS)},
    )


_BY_DIALECT = {name: _build(name) for name in ("sqlite", "postgresql")}


def _statements(conn: Connection) -> _Statements:
    return _BY_DIALECT[conn.dialect.name]
