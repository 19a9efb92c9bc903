"""Re-runs and templates: ``job.parent_job_id`` (the job a ``farm rerun`` copied; set to NULL if
that job is deleted) and ``job_template`` (saved specs, named uniquely within a project). The
downgrade drops both: templates and re-run lineage are lost.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_job_id", sa.Uuid(), nullable=True))
        batch_op.create_index(batch_op.f("ix_job_parent_job_id"), ["parent_job_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_job_parent_job_id_job"), "job", ["parent_job_id"], ["id"], ondelete="SET NULL"
        )
    op.create_table(
        "job_template",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["user.id"], name=op.f("fk_job_template_owner_id_user")),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_job_template_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_template")),
        sa.UniqueConstraint("project_id", "name", name=op.f("uq_job_template_project_id_name")),
    )
    with op.batch_alter_table("job_template", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_template_owner_id"), ["owner_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_template", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_template_owner_id"))
    op.drop_table("job_template")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_job_parent_job_id_job"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_job_parent_job_id"))
        batch_op.drop_column("parent_job_id")
