"""The README's settings table is generated from the settings themselves and must stay current."""

from __future__ import annotations

import re
from pathlib import Path

from farm.cli.config_cmd import markdown_table
from farm.settings import FarmSettings, setting_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_is_current(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    block = re.search(r"<!-- settings:start[^>]*-->\n(.*?)<!-- settings:end -->", README.read_text(), re.S)
    assert block, "README lost its settings markers"
    expected = markdown_table(setting_rows(FarmSettings()))
    assert block.group(1).strip() == expected.strip(), "run `farm config show --markdown` and paste it"
