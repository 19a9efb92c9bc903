"""Reconciler state: when a job's manifest and contact sheet were written, and since when a
worker has been idle.

``job.outputs_written_at`` is set once the outputs of a terminal job are in the store; a job that
ends while the store refuses writes keeps it empty, and the reconciler writes them later.
Existing terminal jobs count as written (at their ``finished_at``). ``worker.idle_since`` tells
the reconciler that a queue's workers wait while its shards wait too: their messages are lost.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outputs_written_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idle_since", sa.DateTime(timezone=True), nullable=True))
    job = sa.table(
        "job",
        sa.column("status", sa.String),
        sa.column("finished_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        sa.column("outputs_written_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        job.update()
        .where(job.c.status.in_(TERMINAL))
        .values(outputs_written_at=sa.func.coalesce(job.c.finished_at, job.c.updated_at))
    )


def downgrade() -> None:
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_column("idle_since")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("outputs_written_at")
