"""Blocklisting: per job and worker failure counts (job_worker), the workers a shard failed on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_worker",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("failures_in_a_row", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("successes", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_job_worker_job_id_job"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "worker", name=op.f("pk_job_worker")),
    )
    with op.batch_alter_table("shard", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failed_workers", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("shard", schema=None) as batch_op:
        batch_op.alter_column("failed_workers", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("shard", schema=None) as batch_op:
        batch_op.drop_column("failed_workers")
    op.drop_table("job_worker")
