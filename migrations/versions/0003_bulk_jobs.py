"""Bulk dataset renders: bulk_job, and job.bulk_id linking the jobs it feeds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_job",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("base_spec", sa.JSON(), nullable=False),
        sa.Column("manifest_keys", sa.JSON(), nullable=False),
        sa.Column("rows_total", sa.Integer(), nullable=False),
        sa.Column("feed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bulk_job")),
        sa.UniqueConstraint("name", name=op.f("uq_bulk_job_name")),
    )
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bulk_id", sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_bulk_id"), ["bulk_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_job_bulk_id_bulk_job"), "bulk_job", ["bulk_id"], ["id"], ondelete="CASCADE"
        )


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_job_bulk_id_bulk_job"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_job_bulk_id"))
        batch_op.drop_column("bulk_id")
    op.drop_table("bulk_job")
