"""Datum aliases in the apply transaction: `valohai.alias` points `datum://<alias>` at a datum.

Apart from `store/datums.py` (reads and API writes), which imports the apply: the apply imports this.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .models import AliasChange, DatumAlias

_ALIASES = cast(Table, DatumAlias.__table__)
_ALIAS_CHANGES = cast(Table, AliasChange.__table__)
_SELECT_ALIAS = select(_ALIASES.c.id, _ALIASES.c.datum_id).where(_ALIASES.c.name == bindparam("name"))


def point_aliases(conn: Connection, claims: dict[str, tuple[int, dict[str, Any]]], now: datetime) -> None:
    """Point each alias at its datum (name -> (datum id, source)), inside the apply transaction.

    A new alias is created; one that points elsewhere moves; each move is a row of
    `alias_changes` (old None: the alias is new). The alias row is locked first (FOR UPDATE on
    PostgreSQL; SQLite's write lock is already held), so two applies moving one alias at once
    record what each really replaced.
    """
    make = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for name, (datum_id, source) in claims.items():
        row = conn.execute(_SELECT_ALIAS.with_for_update(), {"name": name}).first()
        old: int | None = None
        if row is None:
            values = {"name": name, "datum_id": datum_id, "created_at": now, "updated_at": now}
            statement = make(_ALIASES).values(**values).on_conflict_do_nothing().returning(_ALIASES.c.id)
            row = conn.execute(statement).first()
            if row is None:
                # Created since our SELECT by a concurrent apply (its commit let our INSERT go
                # on): move it as any existing alias.
                row = conn.execute(_SELECT_ALIAS.with_for_update(), {"name": name}).first()
                assert row is not None
                old = row.datum_id
        else:
            old = row.datum_id
        if old == datum_id:
            continue
        if old is not None:
            moved = {"datum_id": datum_id, "updated_at": now}
            conn.execute(update(_ALIASES).where(_ALIASES.c.id == row.id).values(**moved))
        change = {"alias_kind": "datum", "alias_id": row.id, "old_id": old, "new_id": datum_id}
        conn.execute(insert(_ALIAS_CHANGES).values(**change, source=source, changed_at=now))
