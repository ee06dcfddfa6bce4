"""Saved searches: a named filter, columns and ordering of one list, SQL only."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from ..errors import InvalidEntry, NotFound
from ..ids import looks_like_id
from ..limits import KEY_MAX, NAME_MAX
from ..query import parse
from .db import writer
from .models import SavedSearch
from .queries import check_ordering, iso

SCOPES = ("datasets", "dataset-versions", "data")
MAX_COLUMNS = 100


class Taken(InvalidEntry):
    """A saved search of that name exists in that scope."""

    def __init__(self, existing: str) -> None:
        super().__init__("a saved search of that name exists in that scope")
        self.existing = existing


def checked(body: Any) -> dict[str, Any]:
    """The fields of a saved search from a request body; InvalidEntry (or FilterError, with the
    position) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise InvalidEntry("expected a JSON object")
    name, scope = body.get("name"), body.get("scope")
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX or _control(name):
        raise InvalidEntry(f"name: 1..{NAME_MAX} characters, not all spaces, no control characters", "name")
    if scope not in SCOPES:
        raise InvalidEntry(f"scope: one of {', '.join(SCOPES)}", "scope")
    # Left out means none; given, each has its type (a null is not a filter).
    text = body.get("filter", "")
    ordering = body.get("ordering", "")
    columns = body.get("columns", [])
    if not isinstance(text, str):
        raise InvalidEntry("filter: a string", "filter")
    if not isinstance(ordering, str):
        raise InvalidEntry("ordering: a string", "ordering")
    if text:
        parse(text)  # FilterError: a 400 with the position
    if ordering:
        check_ordering(ordering)
    if (
        not isinstance(columns, list)
        or len(columns) > MAX_COLUMNS
        or not all(isinstance(c, str) and 0 < len(c) <= KEY_MAX for c in columns)
    ):
        raise InvalidEntry(f"columns: at most {MAX_COLUMNS} keys of 1..{KEY_MAX} characters", "columns")
    return {"name": name.strip(), "scope": scope, "filter": text, "ordering": ordering, "columns": columns}


def _control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def create(engine: Engine, fields: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    try:
        with Session(writer(engine)) as session, session.begin():
            row = SavedSearch(**fields, created_at=now, updated_at=now)
            session.add(row)
            session.flush()
            return shown(row)
    except sqlalchemy.exc.IntegrityError:
        with Session(engine) as session:
            same = (SavedSearch.scope == fields["scope"], SavedSearch.name == fields["name"])
            existing = session.scalar(select(SavedSearch.uid).where(*same))
        raise Taken(existing or "") from None


def listed(engine: Engine, scope: str | None) -> list[dict[str, Any]]:
    with Session(engine) as session:
        query = select(SavedSearch).order_by(SavedSearch.scope, SavedSearch.name)
        if scope is not None:
            query = query.where(SavedSearch.scope == scope)
        return [shown(r) for r in session.scalars(query)]


def get(engine: Engine, ref: str) -> dict[str, Any]:
    with Session(engine) as session:
        return shown(_find(session, ref))


def remove(engine: Engine, ref: str) -> None:
    with Session(writer(engine)) as session, session.begin():
        row = _find(session, ref)
        session.execute(delete(SavedSearch).where(SavedSearch.id == row.id))


def _find(session: Session, ref: str) -> SavedSearch:
    row = None
    if looks_like_id(ref):
        row = session.scalar(select(SavedSearch).where(SavedSearch.uid == ref.lower()))
    if row is None:
        raise NotFound(f"saved search {ref[:100]}")
    return row


def shown(row: SavedSearch) -> dict[str, Any]:
    return {
        "id": row.uid,
        "name": row.name,
        "scope": row.scope,
        "filter": row.filter,
        "columns": list(row.columns or []),
        "ordering": row.ordering,
        "url": f"/{row.scope}/?search={row.uid}",
        "ctime": iso(row.created_at),
    }
