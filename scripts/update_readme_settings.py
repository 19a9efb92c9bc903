"""Regenerate the settings table in README.md from farm/settings.py.

Run: `.venv/bin/python scripts/update_readme_settings.py`
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from farm.cli.config_cmd import markdown_table
from farm.settings import FarmSettings, setting_rows

for name in [n for n in os.environ if n.startswith("FARM_")]:
    del os.environ[name]
readme = Path(__file__).resolve().parents[1] / "README.md"
table = markdown_table(setting_rows(FarmSettings(_env_file=None)))
text = re.sub(
    r"(<!-- settings:start[^>]*-->\n).*?(<!-- settings:end -->)",
    lambda m: m.group(1) + table + "\n" + m.group(2),
    readme.read_text(),
    flags=re.S,
)
readme.write_text(text)
print(f"{readme}: {table.count(chr(10)) - 1} settings")
