"""Writes that do not come from a sidecar file: API calls (user); `valohai.last-used` is last_used.py's.

The staged half of a user's write (stage, then apply, or take it back) is `worker/applying.py`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..errors import BadURI
from ..uris import Target, dataset_target
from .apply import Applier
from .db import writer
from .models import Dataset
from .queries import Ref, get_dataset, get_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteResult:
    """The property set after a write, and whether the write is only staged (version building)."""

    properties: dict[str, Any]
    staged: bool


def target_of(session: Session, kind: str, owner_id: Ref) -> Target:
    """The staging target of a dataset or version id; NotFound if there is none."""
    if kind == "dataset":
        return Target("dataset", get_dataset(session, owner_id).name)
    version = get_version(session, owner_id)
    return Target("version", version.dataset.name, version.name)


def create_dataset(engine: Engine, name: Any) -> tuple[int, bool]:
    """Create the dataset `name` (as a line naming it would): (its id, whether it is new).
    BadURI if the name cannot be a dataset name."""
    if not isinstance(name, str):
        raise BadURI(repr(name)[:100], "name: expected a string")
    dataset_target(f"dataset://{name}")  # the same rule as every dataset URI
    with Session(engine) as session:
        existing = session.scalar(select(Dataset.id).where(Dataset.name == name))
    if existing is not None:
        return existing, False
    with writer(engine).begin() as conn:
        row_id = Applier(conn, datetime.now(UTC)).dataset(name).id
    return row_id, True


def current_properties(engine: Engine, kind: str, owner_id: Ref) -> dict[str, Any]:
    with Session(engine) as session:
        owner = get_dataset(session, owner_id) if kind == "dataset" else get_version(session, owner_id)
        return owner.shown_properties
