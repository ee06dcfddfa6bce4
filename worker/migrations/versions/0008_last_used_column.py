"""`valohai.last-used` in its own column of datasets and versions, out of properties and history.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

KEY = "valohai.last-used"
OWNERS = (("datasets", "dataset"), ("dataset_versions", "version"))


def upgrade() -> None:
    conn = op.get_bind()
    for table, _ in OWNERS:
        op.add_column(table, sa.Column("last_used", sa.String(64), nullable=True))
    for table, _ in OWNERS:
        t = sa.table(table, sa.column("id"), sa.column("properties", sa.JSON), sa.column("last_used"))
        for row_id, properties in conn.execute(sa.select(t.c.id, t.c.properties)).all():
            if not isinstance(properties, dict) or KEY not in properties:
                continue
            value = properties.pop(KEY)
            stamp = value if isinstance(value, str) else None
            conn.execute(t.update().where(t.c.id == row_id).values(properties=properties, last_used=stamp))
    # The touches flooded the history; the value itself stays (column and index row).
    changes = sa.table("property_changes", sa.column("key"))
    conn.execute(changes.delete().where(changes.c.key == KEY))


def downgrade() -> None:
    conn = op.get_bind()
    for table, _ in OWNERS:
        t = sa.table(table, sa.column("id"), sa.column("properties", sa.JSON), sa.column("last_used"))
        rows = conn.execute(
            sa.select(t.c.id, t.c.properties, t.c.last_used).where(t.c.last_used.is_not(None))
        )
        for row_id, properties, stamp in rows.all():
            conn.execute(
                t.update().where(t.c.id == row_id).values(properties={**(properties or {}), KEY: stamp})
            )
    for table, _ in OWNERS:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("last_used")
