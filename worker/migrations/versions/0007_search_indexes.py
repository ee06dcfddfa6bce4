"""Search index for pages at 1M versions: str_key in code-point order, owner_id in the indexes.

* `property_index.str_key` sorts in code-point order on PostgreSQL (COLLATE "C").

`property_index.str_key` took the database's collation, so its btree could serve neither a
prefix `like` (`"3.%"` as the range `"3." <= str_key < "3/"`) nor an ordering by a string
property, both of which compare in code-point order (as Python and SQLite's BINARY do). With the
column in "C", both walk the index. SQLite compares bytes already: nothing changes there. The
column's index is rebuilt by PostgreSQL as part of the type change.

* The value indexes end with `owner_id`, so an ordering by a property reads them in its order
  (value, then id) and stops at the page; the owner index holds `path`, so testing one owner
  for one key is one entry (a filter tested row by row, `Compiler.probe`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


INDEXES = {
    "ix_property_index_num": (["owner_kind", "path", "num"], ["owner_kind", "path", "num", "owner_id"]),
    "ix_property_index_str": (
        ["owner_kind", "path", "str_key"],
        ["owner_kind", "path", "str_key", "owner_id"],
    ),
    "ix_property_index_owner": (["owner_kind", "owner_id"], ["owner_kind", "owner_id", "path"]),
}


def _indexes(which: int) -> None:
    for name, columns in INDEXES.items():
        op.drop_index(name, table_name="property_index")
        op.create_index(name, "property_index", columns[which])


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        _indexes(1)
        return
    op.execute("DROP INDEX ix_property_index_str")  # rebuilt below, after the type change
    op.alter_column(
        "property_index",
        "str_key",
        type_=sa.String(200, collation="C"),
        existing_type=sa.String(200),
        existing_nullable=True,
    )
    for name, columns in INDEXES.items():
        if name != "ix_property_index_str":
            op.drop_index(name, table_name="property_index")
        op.create_index(name, "property_index", columns[1])


def downgrade() -> None:
    _indexes(0)
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column(
        "property_index",
        "str_key",
        type_=sa.String(200),
        existing_type=sa.String(200, collation="C"),
        existing_nullable=True,
    )
