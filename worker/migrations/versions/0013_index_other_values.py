"""A partial index of the property rows that are neither numbers nor strings (booleans, objects,
arrays, nulls), so a facet counts them from the index alone.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_property_index_other",
        "property_index",
        ["owner_kind", "path", "vtype", "bool_value"],
        postgresql_where=sa.text("num IS NULL AND str_key IS NULL"),
        sqlite_where=sa.text("num IS NULL AND str_key IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_property_index_other", table_name="property_index")
