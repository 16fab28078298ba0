"""Alarm messages as a key + arguments, so the page can translate history rows (``message`` stays English).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alarms") as batch:
        batch.add_column(sa.Column("message_key", sa.String(64)))
        batch.add_column(sa.Column("message_args", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("alarms") as batch:
        batch.drop_column("message_args")
        batch.drop_column("message_key")
