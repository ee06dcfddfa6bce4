"""Property definitions, and the violations each dataset, version and datum carries.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OWNERS = ("datasets", "dataset_versions", "datums")


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL (as worker.store.models.JsonType)."""
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "property_definitions",
        sa.Column("key", sa.String(256), primary_key=True),
        sa.Column("scopes", json_type(), nullable=False),
        sa.Column("type", sa.String(16), nullable=True),
        sa.Column("allowed_values", json_type(), nullable=False),
        sa.Column("required", sa.Boolean(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("enforcement", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    for table in OWNERS:
        # ADD COLUMN only: SQLite needs no table copy for it.
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("violations", json_type(), nullable=False, server_default=sa.text("'[]'"))
            )


def downgrade() -> None:
    for table in OWNERS:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("violations")
    op.drop_table("property_definitions")
