"""Tables. Properties live as one JSON object per owner; every change is also kept in `property_changes`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..ids import new_id
from ..merge import same_json


class _JSON(JSON):
    """JSON whose change detection tells `1` from `true`.

    The ORM writes a changed attribute only if the new value differs from the loaded one, and it
    compared them with `==`: a property set whose only change was `1` to `true` (or `1.0`) was
    never written, while its history row said it was.
    """

    cache_ok = True

    def compare_values(self, x: Any, y: Any) -> bool:
        return same_json(x, y)


JsonType = _JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


# Raw inserts (bench/search.py, migrations) need not name `violations`.
_EMPTY = text("'[]'")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JsonType, list[Any]: JsonType, Any: JsonType}


# Every object the API shows has two ids: `id`, the integer key the index and history tables
# refer to, and `uid`, the public time-ordered id in UUID form (worker/ids.py) that the API calls
# `id`. `platform_id` is the platform's own id for the object, when an event carried it; `{id}`
# paths find an object by either.
def _uid() -> Mapped[str]:
    return mapped_column(String(36), index=True, unique=True, default=new_id)


def _platform_id() -> Mapped[str | None]:
    return mapped_column(String(64), index=True, unique=True, nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    platform_id: Mapped[str | None] = _platform_id()
    name: Mapped[str] = mapped_column(String(255), unique=True)
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[list[Any]] = mapped_column(default=list)  # from the platform's events
    # `valohai.last-used` (ISO-8601 text as shown): its own column, out of `properties` and the
    # history, since every read of a version changes it. Shown, searched and sorted as a property.
    last_used: Mapped[str | None] = mapped_column(String(64))
    # What the properties break of their definitions (`warn` ones): [{"key", "rule", "value"}].
    violations: Mapped[list[Any]] = mapped_column(default=list, server_default=_EMPTY)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    versions: Mapped[list[DatasetVersion]] = relationship(back_populates="dataset")

    @property
    def shown_properties(self) -> dict[str, Any]:
        return shown(self.properties, self.last_used)


LAST_USED = "valohai.last-used"


def shown(properties: dict[str, Any] | None, last_used: str | None) -> dict[str, Any]:
    """The properties as the API shows them: the stored set plus `valohai.last-used`."""
    out = dict(properties or {})
    if last_used is not None:
        out[LAST_USED] = last_used
    return out


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "name"),
        # A dataset's latest version: its newest completed one.
        Index("ix_dataset_versions_latest", "dataset_id", "status", "completed_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    platform_id: Mapped[str | None] = _platform_id()
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="building")
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    last_used: Mapped[str | None] = mapped_column(String(64))  # as Dataset
    violations: Mapped[list[Any]] = mapped_column(default=list, server_default=_EMPTY)  # as Dataset
    # Membership as the datums asked for it (`from`, `exclude`, `start_fresh`, `targeting_aliases`,
    # `packaging`), folded from their `valohai.dataset-versions` items; acted on at completion.
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    previous_version_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id"))
    # Why `from` named nothing that exists, when it did not (the version completed with its own files).
    spec_problem: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    dataset: Mapped[Dataset] = relationship(back_populates="versions")

    @property
    def shown_properties(self) -> dict[str, Any]:
        return shown(self.properties, self.last_used)

    @property
    def uri(self) -> str:
        return f"dataset://{self.dataset.name}/{self.name}"


class Datum(Base):
    __tablename__ = "datums"
    __table_args__ = (UniqueConstraint("execution", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    execution: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    violations: Mapped[list[Any]] = mapped_column(default=list, server_default=_EMPTY)  # as Dataset
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The file as it was on disk when its execution completed (None: not read yet, or gone).
    size: Mapped[int | None] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    sha1: Mapped[str | None] = mapped_column(String(40))
    sha256: Mapped[str | None] = mapped_column(String(64))
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class VersionFile(Base):
    """Membership: a datum is one of a version's files."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"), primary_key=True)
    datum_id: Mapped[int] = mapped_column(ForeignKey("datums.id"), primary_key=True)


class VersionAlias(Base):
    """`dataset://<dataset>/<name>` pointing at one version of that dataset (`targeting_aliases`)."""

    __tablename__ = "version_aliases"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    name: Mapped[str] = mapped_column(String(255))
    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DatumAlias(Base):
    """`datum://<name>` pointing at one datum (`valohai.alias`)."""

    __tablename__ = "datum_aliases"

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    name: Mapped[str] = mapped_column(String(255), unique=True)
    datum_id: Mapped[int] = mapped_column(ForeignKey("datums.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasChange(Base):
    """History of an alias: what it pointed at before (None: it was new) and since when."""

    __tablename__ = "alias_changes"
    __table_args__ = (Index("ix_alias_changes_alias", "alias_kind", "alias_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    alias_kind: Mapped[str] = mapped_column(String(16))  # "version" or "datum"
    alias_id: Mapped[int]
    old_id: Mapped[int | None]
    new_id: Mapped[int]
    source: Mapped[dict[str, Any]]
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SavedSearch(Base):
    """A named search of one list: its filter, columns and ordering, with a URL of its own."""

    __tablename__ = "saved_searches"
    __table_args__ = (UniqueConstraint("scope", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    name: Mapped[str] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(String(32))  # "datasets", "dataset-versions" or "data"
    filter: Mapped[str] = mapped_column(Text, default="")
    columns: Mapped[list[Any]] = mapped_column(default=list)
    ordering: Mapped[str] = mapped_column(String(600), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BulkEdit(Base):
    """One bulk edit by filter (`worker/bulk.py`): what it sets, on which owners, and how far it got.

    `state` goes queued → running → done (or failed). `after_id` is its cursor: the owners are
    taken in id order, batch by batch, and the cursor is committed after each batch's apply, so
    an edit interrupted (a killed worker) resumes after the last batch it finished. `done`
    counts the owners handled, `applied` those changed at once, `staged` those still building
    (their change is applied when they complete).
    """

    __tablename__ = "bulk_edits"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))  # "dataset", "version" or "datum"
    filter: Mapped[str] = mapped_column(Text)
    changes: Mapped[dict[str, Any]]  # the body's `set` (null deletes)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    after_id: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    applied: Mapped[int] = mapped_column(BigInteger, default=0)
    staged: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PropertyDefinition(Base):
    """What one key's values must be (worker/definitions.py); a key without one is free-form."""

    __tablename__ = "property_definitions"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    scopes: Mapped[list[Any]]
    type: Mapped[str | None] = mapped_column(String(16))
    allowed_values: Mapped[list[Any]] = mapped_column(default=list)
    required: Mapped[bool] = mapped_column(default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    display_name: Mapped[str] = mapped_column(Text, default="")
    enforcement: Mapped[str] = mapped_column(String(8), default="warn")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DefinitionRecheck(Base):
    """One row (id 1): the definitions' generation and the background re-check's progress.

    Every definition change adds one to `generation` in its own transaction; the re-check
    (`store/definitions.py`, `recheck`) covers `run_generation` and, once through every owner,
    sets `checked_generation` to it. `phase` and `after_id` are its cursor, committed with each
    batch, so a re-check interrupted (a killed worker) resumes where it stopped. The row also
    orders definition changes against applies on PostgreSQL (see `load`).
    """

    __tablename__ = "definition_recheck"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(default=0)
    checked_generation: Mapped[int] = mapped_column(default=0)
    run_generation: Mapped[int | None]
    phase: Mapped[str | None] = mapped_column(String(16))  # "dataset", "version", "datum"
    after_id: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    checked: Mapped[int] = mapped_column(BigInteger, default=0)
    changed: Mapped[int] = mapped_column(BigInteger, default=0)
    violating: Mapped[int] = mapped_column(BigInteger, default=0)
    requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# The row exists from the start (the migration inserts it too): applies lock it to read the
# definitions, and a missing row would leave the first definition's change unordered with them.
event.listen(
    DefinitionRecheck.__table__,
    "after_create",
    DDL(  # type: ignore[no-untyped-call]
        "INSERT INTO definition_recheck (id, generation, checked_generation, after_id, total, checked, "
        "changed, violating) VALUES (1, 0, 0, 0, 0, 0, 0, 0)"
    ),
)


class PropertyChange(Base):
    """History: one row per key that really changed, with where the change came from."""

    __tablename__ = "property_changes"
    __table_args__ = (
        Index("ix_property_changes_owner", "owner_kind", "owner_id", "id"),
        Index("ix_property_changes_made_by", "made_by", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[int]
    key: Mapped[str] = mapped_column(String(256))
    old: Mapped[Any] = mapped_column(nullable=True)
    new: Mapped[Any] = mapped_column(nullable=True)
    source: Mapped[dict[str, Any]]
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # What made the change, as `sidecar rollback` names it: the execution of a sidecar line, the
    # id of a rollback; null for API and platform writes (migration 0010).
    made_by: Mapped[str | None] = mapped_column(String(255))


class Watermark(Base):
    """The last staged entry applied for a target, written in the same transaction as its effects.

    A redelivered or duplicated apply reads only entries after this id, so it changes nothing.
    """

    __tablename__ = "watermarks"

    target: Mapped[str] = mapped_column(String(600), primary_key=True)
    stream_id: Mapped[str | None] = mapped_column(String(64))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PropertyIndex(Base):
    """Search index: one row per property path of a dataset or version, typed.

    `path` is the JSON array of keys (`["a", "b"]` for `a.b`), so keys holding dots stay
    unambiguous. Exactly one of `num`, `str_value`, `bool_value` is set for scalar values; objects
    and arrays get a row with only `vtype` (for `exists`). `str_key` is the first 200 characters
    of a string, indexed (a btree cannot hold arbitrarily long values) in code-point order;
    `str_lower` is the string lowercased in Python, so `ilike` means the same on SQLite and PostgreSQL.
    """

    __tablename__ = "property_index"
    __table_args__ = (
        # owner_id last in the value indexes: an ordering by a property reads them in its
        # order, ties and all, without sorting (migration 0007).
        Index("ix_property_index_num", "owner_kind", "path", "num", "owner_id"),
        Index("ix_property_index_str", "owner_kind", "path", "str_key", "owner_id"),
        # A filter tested row by row looks up (owner, path): one entry, not the owner's every row.
        Index("ix_property_index_owner", "owner_kind", "owner_id", "path"),
        # The rows neither value index types (booleans, objects, arrays, nulls), so a facet
        # counts them without visiting the table (migration 0013).
        Index(
            "ix_property_index_other",
            "owner_kind",
            "path",
            "vtype",
            "bool_value",
            postgresql_where=text("num IS NULL AND str_key IS NULL"),
            sqlite_where=text("num IS NULL AND str_key IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[int]
    path: Mapped[str] = mapped_column(String(2048))
    vtype: Mapped[str] = mapped_column(String(8))
    num: Mapped[float | None] = mapped_column(Float(53))
    # Code-point order on PostgreSQL too, so a prefix `like` and an ordering by a string walk
    # the btree (migration 0007); SQLite's BINARY already is.
    str_key: Mapped[str | None] = mapped_column(
        String(200).with_variant(String(200, collation="C"), "postgresql")
    )
    str_value: Mapped[str | None] = mapped_column(Text)
    str_lower: Mapped[str | None] = mapped_column(Text)
    bool_value: Mapped[bool | None]


class QuarantinedTarget(Base):
    """A target whose apply kept failing with an error that is not transient.

    Its staged entries stay in Redis, held until `sidecar retry` removes this row (and the Redis
    mark); nothing is dropped. `error` is the last error's type and message, for `sidecar status`.
    """

    __tablename__ = "quarantined_targets"

    target: Mapped[str] = mapped_column(String(600), primary_key=True)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int]
    quarantined_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FinishedFile(Base):
    """A tailed file of an execution whose staging state left Redis (see docs/design.md, retention).

    `state` is the file's last checkpoint (FileState JSON, or a per-output file's signature), so a
    rescan of the unchanged file reads nothing and an append or rewrite is told apart; `digests`
    are its line digests (8 bytes per line), so a rewrite or `sidecar replay` stages only what
    is new.
    """

    __tablename__ = "finished_files"

    file: Mapped[str] = mapped_column(Text, primary_key=True)
    execution: Mapped[str] = mapped_column(String(255), index=True)
    state: Mapped[str] = mapped_column(Text)
    digests: Mapped[bytes] = mapped_column(LargeBinary)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FinishedExecution(Base):
    """An execution whose staging state left Redis: what putting it back needs.

    `completed_at` is None for an execution forgotten because its folder was deleted before it
    completed. `flags` maps each completed version the execution fed to its completion flag's
    value, so that a late line finds the flags (and the due set) as they were.
    """

    __tablename__ = "finished_executions"

    execution: Mapped[str] = mapped_column(String(255), primary_key=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    flags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Subscription(Base):
    """A receiver of change notifications (`worker/notifications.py`): where events are POSTed,
    which event types, the filter a target must match (the list endpoints' language; empty:
    every target) and the secret their signature is made with (never shown by the API)."""

    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]]
    filter: Mapped[str] = mapped_column(Text, default="")
    secret: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxEvent(Base):
    """One change notification, written in the transaction of the apply (or quarantine) that
    made it, so it exists if and only if the change committed. `uid` is its idempotency key
    (the body's `id`, the `X-Sidecar-Event-Id` header); `payload` is the body as sent."""

    __tablename__ = "outbox_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = _uid()
    type: Mapped[str] = mapped_column(String(32))
    owner_kind: Mapped[str | None] = mapped_column(String(16))
    owner_id: Mapped[int | None]
    target: Mapped[str] = mapped_column(String(600))
    uri: Mapped[str | None] = mapped_column(String(600))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Delivery(Base):
    """One event for one subscription: `pending` (due at `next_at`), `delivered`, or `failed`
    (given up after `delivery_attempts`; `sidecar deliveries retry` makes it pending again).

    `subscription_id` has no foreign key on purpose: an apply that read the subscriptions may
    still insert a delivery for one deleted meanwhile (PostgreSQL would fail the apply on the
    constraint); the sender drops such a delivery."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_due", "status", "next_at"),
        Index("ix_deliveries_subscription", "subscription_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int]
    event_id: Mapped[int] = mapped_column(ForeignKey("outbox_events.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
