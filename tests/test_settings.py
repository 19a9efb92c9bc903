"""Settings: embedded defaults, env overrides, placeholder secrets, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import ConfigError, FarmError
from farm.settings import FarmSettings, load_settings, redact_url, setting_rows


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("FARM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file is read


def test_defaults_are_the_embedded_mode() -> None:
    s = FarmSettings()
    assert s.embedded
    assert s.database_url == "sqlite:///farm-data/farm.db"
    assert s.local_store_root == Path("farm-data/objects")
    assert s.broker.url == "filesystem://"
    assert s.storage.backend == "local"


def test_nested_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_DB__URL", "postgresql+psycopg://farm:s3cr3t-Value@db:5432/farm")
    monkeypatch.setenv("FARM_BROKER__URL", "redis://cache:6379/0")
    monkeypatch.setenv("FARM_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("FARM_STORAGE__S3__BUCKET", "renders")
    monkeypatch.setenv("FARM_STORAGE__S3__SECRET_ACCESS_KEY", "real-secret-123")
    monkeypatch.setenv("FARM_WORKER__QUEUES", '["farm.gpu.sdxl"]')
    s = load_settings()
    assert not s.embedded
    assert s.database_url.endswith("@db:5432/farm")
    assert s.storage.s3.bucket == "renders"
    assert s.storage.s3.secret_access_key.get_secret_value() == "real-secret-123"
    assert s.worker.queues == ["farm.gpu.sdxl"]
    assert "real-secret-123" not in repr(s)


@pytest.mark.parametrize(
    "env",
    [
        {"FARM_DB__URL": "postgresql://farm:changeme@db/farm"},
        {"FARM_BROKER__URL": "amqp://farm:password@mq:5672//"},
        {"FARM_STORAGE__BACKEND": "s3", "FARM_STORAGE__S3__SECRET_ACCESS_KEY": "minioadmin"},
    ],
)
def test_placeholder_secrets_refused_outside_embedded_mode(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="placeholder secret") as info:
        load_settings()
    assert isinstance(info.value, ValueError) and isinstance(info.value, FarmError)
    assert not info.value.retryable


def test_placeholder_accepted_in_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_STORAGE__S3__SECRET_ACCESS_KEY", "changeme")  # unused: backend is local
    assert load_settings().embedded


def test_unknown_and_out_of_range_settings_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_WORKER__LEASE_SECONDS", "1")
    with pytest.raises(ConfigError, match=r"worker\.lease_seconds"):
        load_settings()
    with pytest.raises(ConfigError, match="nonsense"):
        load_settings(nonsense=1)


def test_redact_url_hides_passwords_only() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url(None) is None


def test_setting_rows_cover_every_leaf_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_STORAGE__S3__ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("FARM_DB__URL", "postgresql://u:topsecret@h/db")
    monkeypatch.setenv("FARM_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("FARM_STORAGE__S3__SECRET_ACCESS_KEY", "another-secret")
    rows = {row.env_var: row for row in setting_rows(load_settings())}
    assert rows["FARM_STORAGE__S3__SECRET_ACCESS_KEY"].current == "***"
    assert "topsecret" not in rows["FARM_DB__URL"].current
    assert {"FARM_DATA_DIR", "FARM_WORKER__MODEL_CACHE_MB", "FARM_BROKER__VISIBILITY_TIMEOUT"} <= rows.keys()
    assert all(row.description for row in rows.values())
