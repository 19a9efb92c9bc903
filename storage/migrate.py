"""Alembic, driven from code: ``farm db upgrade`` and the tests use these functions.

The script folder is the repository's ``migrations/`` (source checkouts and editable installs)
or ``storage/_migrations`` (where the wheel puts the same folder).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from storage.db import make_engine


def script_location() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "migrations", here / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the Alembic scripts (migrations/env.py) are not installed with this package")


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url``. The URL travels in ``attributes``, never through the
    ini-file interpolation or logs (it may hold a password)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at, or ``None`` when it was never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def heads() -> list[str]:
    return list(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())
