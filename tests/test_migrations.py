"""One Alembic tree for Postgres and SQLite: single head, up/down/up with rows, no drift."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from storage import migrate
from storage.db import make_engine, make_session_factory, session_scope
from storage.identity import ensure_default_identity
from storage.models import (
    ApiToken,
    Artifact,
    AuditEvent,
    BulkJob,
    Job,
    JobDependency,
    JobTemplate,
    JobWebhook,
    JobWorker,
    Project,
    ProjectMember,
    QueueFeed,
    Shard,
    ShareUsage,
    User,
    UserWebhook,
    WebhookEvent,
    WebSession,
    Worker,
    metadata,
    utcnow,
)

TABLES = {
    "job",
    "shard",
    "artifact",
    "worker",
    "job_worker",
    "bulk_job",
    "api_token",
    "audit_event",
    "web_session",
    "share_usage",
    "queue_feed",
    "job_dependency",
    "user_webhook",
    "job_webhook",
    "webhook_event",
    "job_template",
}
SEEDED = {"user", "project", "project_member"}  # the upgrade's admin, default, and admin's membership
HEAD = "0010"
ONE_OF_EACH = {**dict.fromkeys(TABLES | SEEDED, 1), "job": 2}  # what _insert_one_of_each writes: a job and its re-run


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("empty_pg_url")


def _insert_one_of_each(url: str) -> None:
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        admin, default = ensure_default_identity(session)
        owned = {"owner_id": admin.id, "project_id": default.id}
        job = Job(kind="text_to_image", family="sd15", spec={"a": 1}, spec_hash="0" * 64, output_prefix="r", **owned)
        shard = Shard(job=job, index=0, queue="farm.gpu.sd15", params={"items": []})
        session.add_all([job, shard])
        session.flush()
        session.add(JobDependency(job_id=job.id, upstream_id=job.id))  # a row of the table, nothing more
        session.add(
            Artifact(
                job_id=job.id,
                shard_id=shard.id,
                key=f"r/{job.id}/00000/000000.png",
                item_index=0,
                seed=2**62,
                sha256="f" * 64,
                size_bytes=10,
                content_type="image/png",
                fencing_token=1,
            )
        )
        session.add(Worker(name=f"w-{uuid.uuid4().hex[:6]}", hostname="h", device="cpu"))
        session.add(JobWorker(job_id=job.id, worker="w"))
        session.add(BulkJob(name=f"bulk-{uuid.uuid4().hex[:6]}", base_spec={}, **owned))
        session.add(ApiToken(user_id=admin.id, name="t", secret_hash="0" * 64))
        session.add(AuditEvent(action="token.create", status=200))
        session.add(WebSession(id_hash=uuid.uuid4().hex * 2, user_id=admin.id, csrf_token="c", expires_at=utcnow()))
        session.add(ShareUsage(project_id=default.id, user_id=admin.id, gpu_seconds=1.0, items=1.0))
        session.add(QueueFeed(queue="farm.gpu.sd15"))
        session.add(UserWebhook(user_id=admin.id, url="https://example.com/hook", secret="whsec_x"))
        session.add(JobWebhook(job_id=job.id, url="https://example.com/hook", events=[], progress_interval_s=60.0))
        session.add(WebhookEvent(job_id=job.id, type="job.started", url="https://example.com/hook", payload={}))
        session.add(JobTemplate(name="t", spec={"prompts": ["x"]}, **owned))
        session.flush()
        session.add(  # a re-run of the job (the job table's second row)
            Job(
                kind="text_to_image",
                family="sd15",
                spec={"a": 1},
                spec_hash="0" * 64,
                output_prefix="r",
                parent_job_id=job.id,
                **owned,
            )
        )
    engine.dispose()


def _counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    with engine.connect() as conn:
        counts = {
            m.__tablename__: conn.scalar(select(func.count()).select_from(m))
            for m in (
                Job,
                Shard,
                Artifact,
                Worker,
                JobWorker,
                BulkJob,
                ApiToken,
                AuditEvent,
                WebSession,
                ShareUsage,
                QueueFeed,
                JobDependency,
                UserWebhook,
                JobWebhook,
                WebhookEvent,
                JobTemplate,
                User,
                Project,
                ProjectMember,
            )
        }
    engine.dispose()
    return counts


def _reruns(url: str) -> int:
    engine = make_engine(url)
    with engine.connect() as conn:
        count = conn.scalar(select(func.count()).select_from(Job).where(Job.parent_job_id.is_not(None)))
    engine.dispose()
    return count


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_single_head() -> None:
    assert migrate.heads() == [HEAD]


def test_upgrade_downgrade_upgrade_with_rows(fresh_url: str) -> None:
    assert migrate.current(fresh_url) is None
    migrate.upgrade(fresh_url)
    assert migrate.current(fresh_url) == HEAD
    _insert_one_of_each(fresh_url)
    assert _counts(fresh_url) == ONE_OF_EACH
    migrate.downgrade(fresh_url, "base")
    assert migrate.current(fresh_url) is None
    assert not (_tables(fresh_url) & (TABLES | SEEDED))
    migrate.upgrade(fresh_url)
    assert _tables(fresh_url) >= TABLES | SEEDED
    assert _counts(fresh_url) == {**dict.fromkeys(TABLES, 0), **dict.fromkeys(SEEDED, 1)}
    _insert_one_of_each(fresh_url)


def _insert_at_0001(url: str) -> uuid.UUID:
    """A job and a shard written with 0001's columns only (the models have 0002's)."""
    from sqlalchemy import column, table

    def rows(model: type, **values: object) -> tuple:
        kept = {c.name: c.type for c in model.__table__.columns if c.name in values}
        return table(model.__tablename__, *(column(n, t) for n, t in kept.items())), values

    now = func.now()
    job_id, shard_id = uuid.uuid4(), uuid.uuid4()
    counts = dict.fromkeys(("shards_total", "shards_done", "shards_failed", "items_total", "items_done"), 0)
    job_table, job_values = rows(
        Job,
        id=job_id,
        kind="text_to_image",
        family="sd15",
        status="running",
        priority=0,
        spec={},
        spec_hash="0" * 64,
        output_prefix="r",
        items_failed=0,
        created_at=now,
        updated_at=now,
        **counts,
    )
    shard_table, shard_values = rows(
        Shard,
        id=shard_id,
        job_id=job_id,
        index=0,
        queue="farm.gpu.sd15",
        status="queued",
        params={},
        items_total=1,
        items_done=0,
        progress=0.0,
        attempts=1,
        fencing_token=1,
        errors=["attempt 1 by w: boom"],
        timings={},
        created_at=now,
        updated_at=now,
    )
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(job_table.insert().values(job_values))
        conn.execute(shard_table.insert().values(shard_values))
    engine.dispose()
    return shard_id


def test_upgrade_from_0001_keeps_shards(fresh_url: str) -> None:
    """0002 adds ``shard.failed_workers`` to existing rows (empty) and the ``job_worker`` table."""
    migrate.upgrade(fresh_url, "0001")
    shard_id = _insert_at_0001(fresh_url)
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with session_scope(make_session_factory(engine)) as session:
        shard = session.get(Shard, shard_id)
        assert (shard.failed_workers, shard.errors) == ([], ["attempt 1 by w: boom"])
    engine.dispose()
    assert "job_worker" in _tables(fresh_url)


def test_models_and_migrations_do_not_drift(fresh_url: str) -> None:
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert diff == []


REBUILD_JOB = f"""
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{HEAD}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job", recreate="always") as batch:
        batch.add_column(sa.Column("note", sa.String(10)))


def downgrade() -> None:
    with op.batch_alter_table("job", recreate="always") as batch:
        batch.drop_column("note")
"""


def test_sqlite_batch_rebuild_keeps_child_rows(tmp_path: Path) -> None:
    """A later migration that rebuilds `job` in batch mode must not cascade-delete its shards."""
    import shutil

    from alembic import command

    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.script_location(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_rebuild_job.py").write_text(REBUILD_JOB.replace('"0007"', f'"{HEAD}"'))
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate.upgrade(url)
    _insert_one_of_each(url)
    config = migrate.alembic_config(url)
    config.set_main_option("script_location", str(scripts))
    command.upgrade(config, "head")
    assert _counts(url) == ONE_OF_EACH
    assert _reruns(url) == 1, "the re-run still names its parent"
    command.downgrade(config, HEAD)
    assert _counts(url) == ONE_OF_EACH
    assert _reruns(url) == 1


def _insert_at_0004(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A job and a bulk job written with 0004's columns, before 0005 gave them owners."""
    from sqlalchemy import column, table

    def old_table(model: type) -> Any:
        kept = [column(c.name, c.type) for c in model.__table__.columns if c.name not in ("owner_id", "project_id")]
        return table(model.__tablename__, *kept)

    now = func.now()
    job_id, bulk_id = uuid.uuid4(), uuid.uuid4()
    counts = dict.fromkeys(("shards_total", "shards_done", "shards_failed", "items_total", "items_done"), 0)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            old_table(BulkJob)
            .insert()
            .values(
                id=bulk_id, name="nightly", base_spec={}, manifest_keys=[], rows_total=0, created_at=now, updated_at=now
            )
        )
        conn.execute(
            old_table(Job)
            .insert()
            .values(
                id=job_id,
                kind="text_to_image",
                family="sd15",
                status="running",
                priority=0,
                spec={},
                spec_hash="0" * 64,
                output_prefix="r",
                items_failed=0,
                bulk_id=bulk_id,
                created_at=now,
                updated_at=now,
                **counts,
            )
        )
    engine.dispose()
    return job_id, bulk_id


def _owners(url: str) -> list[tuple[str, str, str]]:
    """(table, owner name, project name) of every job and bulk job."""
    engine = make_engine(url)
    with engine.connect() as conn:
        found = [
            (model.__tablename__, *row)
            for model in (Job, BulkJob)
            for row in conn.execute(
                select(User.name, Project.name)
                .select_from(model)
                .join(User, User.id == model.owner_id)
                .join(Project, Project.id == model.project_id)
            ).all()
        ]
    engine.dispose()
    return sorted(found)


def test_0005_gives_existing_jobs_to_admin_in_default_and_downgrades(fresh_url: str) -> None:
    migrate.upgrade(fresh_url, "0004")
    job_id, bulk_id = _insert_at_0004(fresh_url)
    migrate.upgrade(fresh_url)
    assert _owners(fresh_url) == [("bulk_job", "admin", "default"), ("job", "admin", "default")]
    engine = make_engine(fresh_url)
    with session_scope(make_session_factory(engine)) as session:
        admin = session.scalar(select(User).where(User.name == "admin"))
        assert admin.role == "admin" and admin.disabled_at is None
        member = session.scalar(select(ProjectMember).where(ProjectMember.user_id == admin.id))
        assert member.manager is True
        assert session.get(Job, job_id).owner_id == admin.id
    engine.dispose()

    migrate.downgrade(fresh_url, "0004")
    assert migrate.current(fresh_url) == "0004"
    assert not (_tables(fresh_url) & {*SEEDED, "api_token", "audit_event"})
    engine = make_engine(fresh_url)
    for name in ("job", "bulk_job"):
        assert not {"owner_id", "project_id"} & {c["name"] for c in inspect(engine).get_columns(name)}
    with engine.connect() as conn:  # the rows survive the downgrade
        assert conn.execute(select(Job.__table__.c.id)).scalars().all() == [job_id]
        assert conn.scalar(select(BulkJob.__table__.c.id)) == bulk_id
    engine.dispose()

    migrate.upgrade(fresh_url)
    assert _owners(fresh_url) == [("bulk_job", "admin", "default"), ("job", "admin", "default")]


def test_0006_adds_passwords_and_web_sessions_and_downgrades(fresh_url: str) -> None:
    migrate.upgrade(fresh_url, "0005")
    engine = make_engine(fresh_url)
    assert "password_hash" not in {c["name"] for c in inspect(engine).get_columns("user")}
    engine.dispose()
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with session_scope(make_session_factory(engine)) as session:
        admin, _ = ensure_default_identity(session)
        admin.password_hash = "$argon2id$..."
        session.add(WebSession(id_hash="a" * 64, user_id=admin.id, csrf_token="c", expires_at=utcnow()))
    engine.dispose()

    migrate.downgrade(fresh_url, "0005")
    assert migrate.current(fresh_url) == "0005"
    assert "web_session" not in _tables(fresh_url)
    engine = make_engine(fresh_url)
    assert "password_hash" not in {c["name"] for c in inspect(engine).get_columns("user")}
    with engine.connect() as conn:  # the users survive the downgrade
        assert conn.execute(select(User.__table__.c.name)).scalars().all() == ["admin"]
    engine.dispose()

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with session_scope(make_session_factory(engine)) as session:
        assert session.scalar(select(User.password_hash).where(User.name == "admin")) is None
        assert session.scalar(select(func.count()).select_from(WebSession)) == 0
    engine.dispose()
