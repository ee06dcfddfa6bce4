"""Read queries for the API and the CLI, and the JSON shapes they answer with."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from ..errors import NotFound
from .models import Dataset, DatasetVersion, Datum, PropertyChange, VersionFile


def list_datasets(
    session: Session, *, name: str | None, limit: int, offset: int
) -> tuple[int, list[Dataset]]:
    query = select(Dataset)
    if name is not None:
        query = query.where(Dataset.name == name)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Dataset.id).limit(limit).offset(offset)).all()
    return count, list(rows)


def list_versions(
    session: Session, *, dataset: str | None, name: str | None, limit: int, offset: int
) -> tuple[int, list[DatasetVersion]]:
    query = select(DatasetVersion).join(Dataset)
    if dataset is not None:
        query = query.where(Dataset.name == dataset)
    if name is not None:
        query = query.where(DatasetVersion.name == name)
    count = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.options(joinedload(DatasetVersion.dataset))
        .order_by(DatasetVersion.id)
        .limit(limit)
        .offset(offset)
    ).all()
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


def iso(moment: datetime | None) -> str | None:
    """ISO-8601 in UTC. SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


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
