"""Job dependencies: ``job.name`` (the spec's name, which ``after:`` may use; indexed per owner) and
the ``job_dependency`` table (the upstream jobs a job's ``after:`` resolved to at submit, with the
mode, ``job`` or ``shard``, and the policy for an upstream that ends badly). The downgrade drops
them: dependent jobs still waiting are released.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_job_owner_id_name_created_at"), ["owner_id", "name", "created_at"], unique=False
        )
    op.create_table(
        "job_dependency",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("upstream_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("policy", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_job_dependency_job_id_job"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["upstream_id"], ["job.id"], name=op.f("fk_job_dependency_upstream_id_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "upstream_id", name=op.f("pk_job_dependency")),
    )
    with op.batch_alter_table("job_dependency", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_dependency_upstream_id"), ["upstream_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_dependency", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_dependency_upstream_id"))
    op.drop_table("job_dependency")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_owner_id_name_created_at"))
        batch_op.drop_column("name")
