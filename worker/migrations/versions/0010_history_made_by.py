"""History rows name what made them (`made_by`, indexed): what `sidecar rollback` looks up.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("property_changes") as batch:
        batch.add_column(sa.Column("made_by", sa.String(255), nullable=True))
    # Rows written before this revision: a sidecar line's change was made by its execution.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE property_changes SET made_by = source->>'execution' WHERE source->>'origin' = 'sidecar'"
        )
    else:
        op.execute(
            "UPDATE property_changes SET made_by = json_extract(source, '$.execution') "
            "WHERE json_extract(source, '$.origin') = 'sidecar'"
        )
    op.create_index("ix_property_changes_made_by", "property_changes", ["made_by", "id"])


def downgrade() -> None:
    op.drop_index("ix_property_changes_made_by", table_name="property_changes")
    with op.batch_alter_table("property_changes") as batch:
        batch.drop_column("made_by")
