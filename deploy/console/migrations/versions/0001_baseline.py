"""Baseline: the store as it was before migrations (verdicts, reviews, dead_letters).

Frozen here on purpose: later schema changes are new revisions, never edits to this one.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verdicts",
        sa.Column("uid", sa.String(32), primary_key=True),
        sa.Column("station", sa.String(64), nullable=False),
        sa.Column("camera", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("captured_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float, nullable=False),
        sa.Column("model_name", sa.String(128)),
        sa.Column("model_version", sa.String(64)),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("top_class", sa.String(128), nullable=False),
        sa.Column("defect_class", sa.String(128)),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("top_score", sa.Float, nullable=False),
        sa.Column("boxes", sa.Text),
        sa.Column("snapshot", sa.String(255)),
        sa.Column("snapshot_path", sa.Text),
    )
    op.create_index("ix_verdicts_time", "verdicts", ["captured_at"])
    op.create_index("ix_verdicts_cam_time", "verdicts", ["station", "camera", "captured_at"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("verdict_uid", sa.String(32), sa.ForeignKey("verdicts.uid", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("label", sa.String(128)),
        sa.Column("boxes", sa.Text),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_reviews_verdict", "reviews", ["verdict_uid", "id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("station", sa.Text),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("row", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("reviews")
    op.drop_table("verdicts")
