"""Platform fidelity: public time-ordered ids, platform ids, tags, membership specs, checksums, aliases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Every existing dataset, version and datum gets a public id in UUID form made from its creation
time (datums, which had none, take their last update as their creation), so the ids sort as the
rows were made and nothing already stored changes meaning. The integer keys stay: the index and
history tables refer to them, and old integer ids in URLs keep working.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from worker.ids import new_id

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL (as worker.store.models.JsonType)."""
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _fill_uids(table: str, created: str) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text(f"SELECT id, {created} FROM {table} ORDER BY id")).all()
    updates = [{"id": row[0], "uid": new_id(_ms(row[1]))} for row in rows]
    for start in range(0, len(updates), 10_000):
        conn.execute(
            sa.text(f"UPDATE {table} SET uid = :uid WHERE id = :id"), updates[start : start + 10_000]
        )


def _ms(moment: datetime | str | None) -> int | None:
    if moment is None:
        return None
    if isinstance(moment, str):  # SQLite may hand back text
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("platform_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("tags", json_type(), nullable=False, server_default=sa.text("'[]'")))
    with op.batch_alter_table("dataset_versions") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("platform_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("tags", json_type(), nullable=False, server_default=sa.text("'[]'")))
        batch.add_column(sa.Column("spec", json_type(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("previous_version_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("spec_problem", sa.Text(), nullable=True))
        batch.create_foreign_key(
            "fk_dataset_versions_previous_version_id", "dataset_versions", ["previous_version_id"], ["id"]
        )
    with op.batch_alter_table("datums") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("created_at", timestamp(), nullable=True))
        batch.add_column(sa.Column("size", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("md5", sa.String(32), nullable=True))
        batch.add_column(sa.Column("sha1", sa.String(40), nullable=True))
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("checked_at", timestamp(), nullable=True))
    op.execute("UPDATE datums SET created_at = updated_at")
    _fill_uids("datasets", "created_at")
    _fill_uids("dataset_versions", "created_at")
    _fill_uids("datums", "created_at")
    for table in ("datasets", "dataset_versions", "datums"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("uid", existing_type=sa.String(36), nullable=False)
            if table == "datums":
                batch.alter_column("created_at", existing_type=timestamp(), nullable=False)
        op.create_index(f"ix_{table}_uid", table, ["uid"], unique=True)
        if table != "datums":
            op.create_index(f"ix_{table}_platform_id", table, ["platform_id"], unique=True)

    op.create_index(
        "ix_dataset_versions_latest", "dataset_versions", ["dataset_id", "status", "completed_at"]
    )
    op.create_table(
        "version_aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(36), nullable=False),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id"), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
        sa.UniqueConstraint("dataset_id", "name"),
    )
    op.create_index("ix_version_aliases_uid", "version_aliases", ["uid"], unique=True)
    op.create_index("ix_version_aliases_version_id", "version_aliases", ["version_id"])
    op.create_table(
        "datum_aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("datum_id", sa.Integer(), sa.ForeignKey("datums.id"), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=False),
    )
    op.create_index("ix_datum_aliases_uid", "datum_aliases", ["uid"], unique=True)
    op.create_index("ix_datum_aliases_datum_id", "datum_aliases", ["datum_id"])
    op.create_table(
        "alias_changes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("alias_kind", sa.String(16), nullable=False),
        sa.Column("alias_id", sa.Integer(), nullable=False),
        sa.Column("old_id", sa.Integer(), nullable=True),
        sa.Column("new_id", sa.Integer(), nullable=False),
        sa.Column("source", json_type(), nullable=False),
        sa.Column("changed_at", timestamp(), nullable=False),
    )
    op.create_index("ix_alias_changes_alias", "alias_changes", ["alias_kind", "alias_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_alias_changes_alias", table_name="alias_changes")
    op.drop_table("alias_changes")
    op.drop_table("datum_aliases")
    op.drop_table("version_aliases")
    op.drop_index("ix_dataset_versions_latest", table_name="dataset_versions")
    for table in ("datasets", "dataset_versions", "datums"):
        op.drop_index(f"ix_{table}_uid", table_name=table)
        if table != "datums":
            op.drop_index(f"ix_{table}_platform_id", table_name=table)
    with op.batch_alter_table("datums") as batch:
        for column in ("checked_at", "sha256", "sha1", "md5", "size", "created_at", "uid"):
            batch.drop_column(column)
    with op.batch_alter_table("dataset_versions") as batch:
        batch.drop_constraint("fk_dataset_versions_previous_version_id", type_="foreignkey")
        for column in ("spec_problem", "previous_version_id", "spec", "tags", "platform_id", "uid"):
            batch.drop_column(column)
    with op.batch_alter_table("datasets") as batch:
        for column in ("tags", "platform_id", "uid"):
            batch.drop_column(column)
