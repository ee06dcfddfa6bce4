"""Read queries for the API and the CLI, and the JSON shapes they answer with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from ..errors import NotFound
from ..query import parse
from ..uris import parse_uri
from . import aliases, search
from .models import Dataset, DatasetVersion, Datum, PropertyChange, VersionFile
from .search import Compiler, OwnerKind, OwnerSets, ids_in, order_by, ordering_key


@dataclass(frozen=True)
class ListQuery:
    """What a list request asks for: exact names, a filter expression, an ordering key, a page."""

    name: str | None = None
    dataset: str | None = None
    filter: str | None = None
    ordering: str | None = None
    limit: int = 100
    offset: int = 0


def list_datasets(session: Session, ask: ListQuery) -> tuple[int, list[Dataset]]:
    """Datasets matching `ask`; FilterError if its filter or ordering does not parse."""
    where = [] if ask.name is None else [Dataset.name == ask.name]
    query = select(Dataset).where(*where)
    ids = select(Dataset.id).where(*where) if where else None
    return _run(session, query, ids, ask, "dataset", Dataset.id)


def list_versions(session: Session, ask: ListQuery) -> tuple[int, list[DatasetVersion]]:
    """Versions matching `ask`; FilterError if its filter or ordering does not parse."""
    where = []
    if ask.dataset is not None:
        where.append(Dataset.name == ask.dataset)
    if ask.name is not None:
        where.append(DatasetVersion.name == ask.name)
    query = select(DatasetVersion).join(Dataset).where(*where).options(joinedload(DatasetVersion.dataset))
    ids = select(DatasetVersion.id).join(Dataset).where(*where) if where else None
    return _run(session, query, ids, ask, "version", DatasetVersion.id)


def _run(
    session: Session, query: Any, ids: Any, ask: ListQuery, kind: OwnerKind, owner_id: Any
) -> tuple[int, list[Any]]:
    """Count and page `query` (the listed rows; `ids`, their ids, when names narrow them) under
    the filter and ordering of `ask`.

    The filter is first evaluated as a set of ids (`OwnerSets`): from the rows the names leave,
    when there are at most `CAP`, else from a selective part of the filter. Only when neither
    exists does the database evaluate the whole filter (`Compiler.condition`)."""
    dialect = session.get_bind().dialect.name
    node = parse(ask.filter) if ask.filter else None
    ordering = ordering_key(ask.ordering) if ask.ordering else None
    if node is not None:
        compiler = Compiler(kind, owner_id, dialect)
        cap = search.CAP
        candidates = None
        if ids is not None:
            listed = session.scalars(ids.limit(cap + 1)).all()
            candidates = set(listed) if len(listed) <= cap else None
        matching = OwnerSets(session, compiler, cap).matching(node, candidates)
        if matching is None:
            query = query.where(compiler.condition(node))
        elif not matching:
            return 0, []
        else:
            query = query.where(ids_in(owner_id, matching, dialect))
    count = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    if ordering is not None:
        key, descending = ordering
        query = order_by(query, kind, owner_id, key, descending, dialect)
    else:
        query = query.order_by(owner_id)
    rows = session.scalars(query.limit(ask.limit).offset(ask.offset)).unique().all()
    return count, list(rows)


def get_dataset(session: Session, dataset_id: int) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id}")
    return row


def get_version(session: Session, version_id: int) -> DatasetVersion:
    row = session.get(DatasetVersion, version_id)
    if row is None:
        raise NotFound(f"dataset version {version_id}")
    return row


def dataset_json(row: Dataset) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "uri": f"dataset://{row.name}",
        "properties": row.properties or {},
        "created_at": iso(row.created_at),
    }


def version_json(session: Session, row: DatasetVersion) -> dict[str, Any]:
    files = session.execute(
        select(Datum.execution, Datum.path, Datum.properties)
        .join(VersionFile, VersionFile.datum_id == Datum.id)
        .where(VersionFile.version_id == row.id)
        .order_by(Datum.execution, Datum.path)
    ).all()
    return {
        "id": row.id,
        "name": row.name,
        "dataset": {"id": row.dataset.id, "name": row.dataset.name},
        "uri": row.uri,
        "status": row.status,
        "properties": row.properties or {},
        "files": [{"execution": e, "path": p, "properties": props or {}} for e, p, props in files],
        "completed_at": iso(row.completed_at),
    }


# Datum keys that the datum object shows as fields of their own, not among its properties.
DATUM_FIELD_KEYS = ("valohai.tags", "valohai.alias")


def datum_json(row: Datum, alias: str | None = None) -> dict[str, Any]:
    """A datum as the platform shows one: `name` is its path in the execution's outputs folder."""
    properties = row.properties or {}
    tags = properties.get("valohai.tags")
    return {
        "id": row.uid,
        "name": row.path,
        "size": row.size,
        "md5": row.md5,
        "sha1": row.sha1,
        "sha256": row.sha256,
        "ctime": iso(row.created_at),
        "mtime": iso(row.updated_at),
        "uri": None,
        "purged": False,
        "output_execution": {"id": row.execution},
        "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [],
        "alias": alias,
        "properties": {k: v for k, v in properties.items() if k not in DATUM_FIELD_KEYS},
    }


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC. SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None:
        return None
    return _aware(moment).astimezone(UTC).isoformat()


def history(
    session: Session, kind: str, owner_id: int, *, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """Changes to one dataset's or version's properties, oldest first."""
    where = (PropertyChange.owner_kind == kind, PropertyChange.owner_id == owner_id)
    count = session.scalar(select(func.count()).select_from(PropertyChange).where(*where)) or 0
    rows = session.scalars(
        select(PropertyChange).where(*where).order_by(PropertyChange.id).limit(limit).offset(offset)
    )
    return count, [
        {"key": r.key, "old": r.old, "new": r.new, "source": r.source, "changed_at": iso(r.changed_at)}
        for r in rows
    ]


def find_by_uri(session: Session, uri: str) -> tuple[str, int]:
    """(`dataset` or `version`, id) of `dataset://<name>` or `dataset://<name>/<version>`, where
    the version part may also be `latest` (the newest completed) or an alias (`aliases.resolve`)."""
    name, version = parse_uri(uri, allow_latest=True)
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFound(f"dataset://{name}")
    if version is None:
        return "dataset", dataset.id
    row = aliases.resolve(session, name, version)
    if row is None:
        raise NotFound(uri)
    return "version", row.id


def stale(session: Session, cutoff: datetime) -> list[dict[str, Any]]:
    """Datasets and versions not used since `cutoff` (never used: created before it)."""
    out: list[dict[str, Any]] = []
    owners: list[tuple[str, Any]] = [("dataset", Dataset), ("version", DatasetVersion)]
    for kind, model in owners:
        for row in session.scalars(select(model).order_by(model.id)):
            used = (row.properties or {}).get("valohai.last-used")
            when = _parse_time(used) if isinstance(used, str) else None
            reference = when or _aware(row.created_at)
            if reference < cutoff:
                uri = f"dataset://{row.name}" if kind == "dataset" else row.uri
                out.append({"kind": kind, "id": row.id, "uri": uri, "last_used": used})
    return out


def _parse_time(text: str) -> datetime | None:
    try:
        return _aware(datetime.fromisoformat(text))
    except ValueError:
        return None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
