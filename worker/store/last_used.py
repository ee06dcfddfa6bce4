"""`valohai.last-used`: its own column and one index row, never a property change in the history.

It changes on every read of a version, so kept as a property it flooded `property_changes`. The
column holds it for display; one `property_index` row (path `["valohai.last-used"]`) keeps it
searchable and sortable like any property. The apply never writes that row: the key cannot be
in a stored property set (it is reserved), and a full re-index spares it (`index.reindex`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Engine, Table, delete, update

from ..uris import Target
from .apply import Applier, lock_watermark
from .db import writer
from .index import LAST_USED_PATH, bulk_insert, index_rows
from .models import LAST_USED, Dataset, DatasetVersion, PropertyIndex

_INDEX = cast(Table, PropertyIndex.__table__)
_TABLES = {"dataset": cast(Table, Dataset.__table__), "version": cast(Table, DatasetVersion.__table__)}


def touch_last_used(engine: Engine, version: Target, now: datetime | None = None) -> None:
    """Record that a version (and so its dataset) was referenced: `valohai.last-used` on both."""
    stamp = (now or datetime.now(UTC)).isoformat()
    for target in (version, version.dataset_target):
        # The watermark lock, as an apply of the target takes: two touches at once must not
        # both delete the (missing) index row and then both insert one.
        with writer(engine).begin() as conn:
            lock_watermark(conn, target.key)
            applier = Applier(conn, datetime.now(UTC))
            owner = applier.version(target) if target.kind == "version" else applier.dataset(target.dataset)
            table = _TABLES[owner.kind]
            conn.execute(update(table).where(table.c.id == owner.id).values(last_used=stamp))
            conn.execute(
                delete(_INDEX).where(
                    _INDEX.c.owner_kind == owner.kind,
                    _INDEX.c.owner_id == owner.id,
                    _INDEX.c.path == LAST_USED_PATH,
                )
            )
            bulk_insert(conn, _INDEX, index_rows(owner.kind, owner.id, {LAST_USED: stamp}))
