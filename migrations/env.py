"""Alembic environment: one migration tree for Postgres and SQLite (batch mode on SQLite)."""

from __future__ import annotations

from alembic import context

from storage.db import make_engine
from storage.models import metadata

config = context.config


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL given to the migrations (farm db upgrade passes one)")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # Batch mode rebuilds a table by copy, DROP and rename; with foreign keys on, that
                # DROP cascades (rebuilding `job` would delete every shard). The pragma only takes
                # effect outside a transaction, hence the commit before migrating.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run `farm db upgrade`")
run_migrations_online()
