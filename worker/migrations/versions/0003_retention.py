"""Finished files and executions: what outlives an execution's staging state in Redis.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL (as worker.store.models.JsonType)."""
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "finished_files",
        sa.Column("file", sa.Text(), primary_key=True),
        sa.Column("execution", sa.String(255), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("digests", sa.LargeBinary(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_finished_files_execution", "finished_files", ["execution"])
    op.create_table(
        "finished_executions",
        sa.Column("execution", sa.String(255), primary_key=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("flags", json_type(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("finished_executions")
    op.drop_index("ix_finished_files_execution", table_name="finished_files")
    op.drop_table("finished_files")
