"""The definitions' generation and the background re-check's progress (one row).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "definition_recheck",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("checked_generation", sa.Integer(), nullable=False),
        sa.Column("run_generation", sa.Integer(), nullable=True),
        sa.Column("phase", sa.String(16), nullable=True),
        sa.Column("after_id", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("checked", sa.BigInteger(), nullable=False),
        sa.Column("changed", sa.BigInteger(), nullable=False),
        sa.Column("violating", sa.BigInteger(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Definitions made before this revision were re-checked by hand (`sidecar definitions
    # recheck`) if at all: generation 1 against 0 asks for one re-check when any exist.
    defined = op.get_bind().execute(sa.text("SELECT count(*) FROM property_definitions")).scalar()
    op.bulk_insert(
        table,
        [
            {
                "id": 1,
                "generation": 1 if defined else 0,
                "checked_generation": 0,
                "after_id": 0,
                "total": 0,
                "checked": 0,
                "changed": 0,
                "violating": 0,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("definition_recheck")
