"""Initial schema: datasets, versions, datums, membership, history, search index, watermarks.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL (as worker.store.models.JsonType)."""
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("properties", json_type(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id"), nullable=False, index=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("properties", json_type(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.Column("completed_at", timestamp(), nullable=True),
        sa.UniqueConstraint("dataset_id", "name"),
    )
    op.create_table(
        "datums",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("execution", sa.String(255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("properties", json_type(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.UniqueConstraint("execution", "path"),
    )
    op.create_table(
        "version_files",
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id"), primary_key=True),
        sa.Column("datum_id", sa.Integer(), sa.ForeignKey("datums.id"), primary_key=True),
    )
    op.create_table(
        "property_changes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(256), nullable=False),
        sa.Column("old", json_type(), nullable=True),
        sa.Column("new", json_type(), nullable=True),
        sa.Column("source", json_type(), nullable=False),
        sa.Column("changed_at", timestamp(), nullable=False),
    )
    op.create_index("ix_property_changes_owner", "property_changes", ["owner_kind", "owner_id", "id"])
    op.create_table(
        "property_index",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("owner_kind", sa.String(16), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("vtype", sa.String(8), nullable=False),
        sa.Column("num", sa.Float(precision=53), nullable=True),
        sa.Column("str_key", sa.String(200), nullable=True),
        sa.Column("str_value", sa.Text(), nullable=True),
        sa.Column("str_lower", sa.Text(), nullable=True),
        sa.Column("bool_value", sa.Boolean(), nullable=True),
    )
    op.create_index("ix_property_index_num", "property_index", ["owner_kind", "path", "num"])
    op.create_index("ix_property_index_str", "property_index", ["owner_kind", "path", "str_key"])
    op.create_index("ix_property_index_owner", "property_index", ["owner_kind", "owner_id"])
    op.create_table(
        "watermarks",
        sa.Column("target", sa.String(600), primary_key=True),
        sa.Column("stream_id", sa.String(64), nullable=True),
        sa.Column("applied_at", timestamp(), nullable=True),
    )


def downgrade() -> None:
    for table in (
        "watermarks",
        "property_index",
        "property_changes",
        "version_files",
        "datums",
        "dataset_versions",
        "datasets",
    ):
        op.drop_table(table)
