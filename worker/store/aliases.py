"""Version aliases (`dataset://<name>/<alias>`, moved by `targeting_aliases`): reads and writes, SQL only.

Resolution of the version part of a URI, everywhere one is accepted: a version of that name wins;
else `latest`, the newest completed version; else an alias of that name.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ..ids import new_id
from ..uris import LATEST
from .models import AliasChange, Dataset, DatasetVersion, VersionAlias
from .search import ids_in

_DATASETS = cast(Table, Dataset.__table__)
_VERSIONS = cast(Table, DatasetVersion.__table__)
_ALIASES = cast(Table, VersionAlias.__table__)
_CHANGES = cast(Table, AliasChange.__table__)

_BY_NAME = (
    select(_VERSIONS.c.id, _VERSIONS.c.status)
    .join(_DATASETS, _DATASETS.c.id == _VERSIONS.c.dataset_id)
    .where(_DATASETS.c.name == bindparam("dataset"), _VERSIONS.c.name == bindparam("name"))
)
_LATEST = (
    select(_VERSIONS.c.id, _VERSIONS.c.status)
    .join(_DATASETS, _DATASETS.c.id == _VERSIONS.c.dataset_id)
    .where(_DATASETS.c.name == bindparam("dataset"), _VERSIONS.c.status == "completed")
    .order_by(_VERSIONS.c.completed_at.desc(), _VERSIONS.c.id.desc())
    .limit(1)
)
_BY_ALIAS = (
    select(_VERSIONS.c.id, _VERSIONS.c.status)
    .join(_ALIASES, _ALIASES.c.version_id == _VERSIONS.c.id)
    .join(_DATASETS, _DATASETS.c.id == _ALIASES.c.dataset_id)
    .where(_DATASETS.c.name == bindparam("dataset"), _ALIASES.c.name == bindparam("name"))
)
_ALIAS_ROW = select(_ALIASES.c.id, _ALIASES.c.version_id).where(
    _ALIASES.c.dataset_id == bindparam("dataset_id"), _ALIASES.c.name == bindparam("name")
)


def resolve(conn: Connection | Session, dataset: str, name: str) -> Row[Any, Any] | None:
    """(id, status) of the version `dataset://<dataset>/<name>` means now, or None.

    A version named `name` wins over an alias of that name (an alias may not be created under a
    version's name, but a version may be created later under an alias's); `latest` is the newest
    completed version.
    """
    names = {"dataset": dataset, "name": name}
    row = conn.execute(_BY_NAME, names).first()
    if row is None and name == LATEST:
        row = conn.execute(_LATEST, names).first()
    if row is None:
        row = conn.execute(_BY_ALIAS, names).first()
    return row


def _dialect(session: Connection | Session) -> str:
    return session.get_bind().dialect.name if isinstance(session, Session) else session.dialect.name


def version_aliases(session: Connection | Session, version_ids: Iterable[int]) -> dict[int, list[str]]:
    """The aliases pointing at each of `version_ids` (sorted names; a version without any is
    absent), in one query."""
    ids = sorted(set(version_ids))
    if not ids:
        return {}
    rows = session.execute(
        select(_ALIASES.c.version_id, _ALIASES.c.name)
        .where(ids_in(_ALIASES.c.version_id, ids, _dialect(session)))
        .order_by(_ALIASES.c.version_id, _ALIASES.c.name)
    )
    out: dict[int, list[str]] = {}
    for version_id, name in rows:
        out.setdefault(version_id, []).append(name)
    return out


def version_name_taken(conn: Connection, dataset_id: int, name: str) -> bool:
    """True if the dataset has a version called `name` (an alias may not take that name)."""
    query = select(_VERSIONS.c.id).where(_VERSIONS.c.dataset_id == dataset_id, _VERSIONS.c.name == name)
    return conn.execute(query.limit(1)).first() is not None


def move(
    conn: Connection, dataset_id: int, name: str, version_id: int, source: dict[str, Any], now: datetime
) -> int | None:
    """Point alias `name` of the dataset at `version_id` (creating it), with a history row in
    `alias_changes`; the version it pointed at before (None: new, or already this one)."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    # Two completions moving one alias at once: the INSERT of the second waits on the unique index
    # for the first to commit (PostgreSQL), then finds the row, which FOR UPDATE holds until ours
    # commits; the last completion to commit is where the alias points.
    created = conn.execute(
        insert(_ALIASES)
        .values(
            uid=new_id(),
            dataset_id=dataset_id,
            name=name,
            version_id=version_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(_ALIASES.c.id)
    ).first()
    old: int | None = None
    if created is not None:
        alias_id = created.id
    else:
        row = conn.execute(_ALIAS_ROW.with_for_update(), {"dataset_id": dataset_id, "name": name}).one()
        alias_id, old = row.id, row.version_id
        if old == version_id:
            return None
        conn.execute(
            update(_ALIASES).where(_ALIASES.c.id == alias_id).values(version_id=version_id, updated_at=now)
        )
    conn.execute(
        _CHANGES.insert().values(
            alias_kind="version",
            alias_id=alias_id,
            old_id=old,
            new_id=version_id,
            source=source,
            changed_at=now,
        )
    )
    return old
