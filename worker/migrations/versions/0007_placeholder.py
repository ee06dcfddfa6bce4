"""Placeholder for the 0007 another branch lands (dropped when the branches are merged).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: this only holds the chain's place for 0008 and 0009."""


def downgrade() -> None:
    """Nothing to undo."""
