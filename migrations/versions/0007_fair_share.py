"""Fair share, quotas and preemption: each job's service class (``interactive`` or ``bulk``; a bulk
run's jobs are bulk), a preemption request on shards, fair-share weights and running caps on
projects, running and daily-item caps on users, the ``share_usage`` ledger of decayed GPU seconds,
one ``queue_feed`` row per queue for the feeder's lock, and the shard index that reads a job's
next pending shards in order. The downgrade drops them: usage history and caps are lost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("service_class", sa.String(length=16), nullable=False, server_default="interactive")
        )
    op.execute("UPDATE job SET service_class = 'bulk' WHERE bulk_id IS NOT NULL")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.alter_column("service_class", server_default=None)
    with op.batch_alter_table("shard", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preempt_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_index("ix_shard_job_id_status")
        batch_op.create_index(batch_op.f("ix_shard_job_id_status_index"), ["job_id", "status", "index"], unique=False)
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(sa.Column("share_weight", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("max_running_shards", sa.Integer(), nullable=True))
    with op.batch_alter_table("user", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_running_shards", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_items_per_day", sa.Integer(), nullable=True))
    op.create_table(
        "share_usage",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("items", sa.Float(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_share_usage_project_id_project"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"], name=op.f("fk_share_usage_user_id_user"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("project_id", "user_id", name=op.f("pk_share_usage")),
    )
    op.create_table(
        "queue_feed",
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("fed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("queue", name=op.f("pk_queue_feed")),
    )


def downgrade() -> None:
    op.drop_table("queue_feed")
    op.drop_table("share_usage")
    with op.batch_alter_table("user", schema=None) as batch_op:
        batch_op.drop_column("max_items_per_day")
        batch_op.drop_column("max_running_shards")
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("max_running_shards")
        batch_op.drop_column("share_weight")
    with op.batch_alter_table("shard", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_shard_job_id_status_index"))
        batch_op.create_index("ix_shard_job_id_status", ["job_id", "status"], unique=False)
        batch_op.drop_column("preempt_requested_at")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("service_class")
