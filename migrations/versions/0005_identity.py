"""Identity and ownership: users, projects and their members, API tokens, the audit log; every
job and bulk job has an owner and a project.

The upgrade creates the user ``admin`` (role admin) and the project ``default`` (admin manages
it); jobs and bulk jobs that exist already become admin's, in ``default``. The downgrade drops the
ownership columns and the tables (users, tokens and the audit log are lost).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OWNED = ("job", "bulk_job")


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "user",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "role", sa.Enum("admin", "member", "viewer", name="role", native_enum=False, length=16), nullable=False
        ),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user")),
        sa.UniqueConstraint("name", name=op.f("uq_user_name")),
    )
    op.create_table(
        "project",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project")),
        sa.UniqueConstraint("name", name=op.f("uq_project_name")),
    )
    op.create_table(
        "project_member",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("manager", sa.Boolean(), nullable=False),
        *_timestamps(),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user.id"], name=op.f("fk_project_member_user_id_user"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_project_member_project_id_project"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "project_id", name=op.f("pk_project_member")),
    )
    with op.batch_alter_table("project_member", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_project_member_project_id"), ["project_id"], unique=False)
    op.create_table(
        "api_token",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        *_timestamps(),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"], name=op.f("fk_api_token_user_id_user"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_user_id"), ["user_id"], unique=False)
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("token_id", sa.Uuid(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=True),
        sa.Column("remote", sa.String(length=64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_event_at"), ["at"], unique=False)

    admin_id, project_id = _default_identity()
    for name in OWNED:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.add_column(sa.Column("owner_id", sa.Uuid(), nullable=True))
            batch_op.add_column(sa.Column("project_id", sa.Uuid(), nullable=True))
        owned = sa.table(name, sa.column("owner_id", sa.Uuid()), sa.column("project_id", sa.Uuid()))
        op.execute(owned.update().values(owner_id=admin_id, project_id=project_id))
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.alter_column("owner_id", existing_type=sa.Uuid(), nullable=False)
            batch_op.alter_column("project_id", existing_type=sa.Uuid(), nullable=False)
            batch_op.create_index(batch_op.f(f"ix_{name}_owner_id"), ["owner_id"], unique=False)
            batch_op.create_index(batch_op.f(f"ix_{name}_project_id"), ["project_id"], unique=False)
            batch_op.create_foreign_key(batch_op.f(f"fk_{name}_owner_id_user"), "user", ["owner_id"], ["id"])
            batch_op.create_foreign_key(batch_op.f(f"fk_{name}_project_id_project"), "project", ["project_id"], ["id"])


def _default_identity() -> tuple[uuid.UUID, uuid.UUID]:
    """The user ``admin`` and the project ``default`` (admin manages it); returns their ids."""
    now = datetime.now(UTC)

    def stamp() -> tuple[sa.ColumnClause, ...]:  # fresh columns for each table
        return sa.column("created_at", sa.DateTime(timezone=True)), sa.column("updated_at", sa.DateTime(timezone=True))

    user = sa.table(
        "user", sa.column("id", sa.Uuid()), sa.column("name", sa.String), sa.column("role", sa.String), *stamp()
    )
    project = sa.table("project", sa.column("id", sa.Uuid()), sa.column("name", sa.String), *stamp())
    member = sa.table(
        "project_member",
        sa.column("user_id", sa.Uuid()),
        sa.column("project_id", sa.Uuid()),
        sa.column("manager", sa.Boolean()),
        *stamp(),
    )
    admin_id, project_id = uuid.uuid4(), uuid.uuid4()
    times = {"created_at": now, "updated_at": now}
    op.execute(user.insert().values(id=admin_id, name="admin", role="admin", **times))
    op.execute(project.insert().values(id=project_id, name="default", **times))
    op.execute(member.insert().values(user_id=admin_id, project_id=project_id, manager=True, **times))
    return admin_id, project_id


def downgrade() -> None:
    for name in reversed(OWNED):
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"fk_{name}_project_id_project"), type_="foreignkey")
            batch_op.drop_constraint(batch_op.f(f"fk_{name}_owner_id_user"), type_="foreignkey")
            batch_op.drop_index(batch_op.f(f"ix_{name}_project_id"))
            batch_op.drop_index(batch_op.f(f"ix_{name}_owner_id"))
            batch_op.drop_column("project_id")
            batch_op.drop_column("owner_id")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_event_at"))
    op.drop_table("audit_event")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_user_id"))
    op.drop_table("api_token")
    with op.batch_alter_table("project_member", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_project_member_project_id"))
    op.drop_table("project_member")
    op.drop_table("project")
    op.drop_table("user")
