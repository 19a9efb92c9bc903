"""The package boundaries in DESIGN.md: the base install never needs torch, patching stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level module names each file of a package imports (absolute imports)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("patching", {"farm", "tasks", "storage"}),
        ("storage", {"torch", "diffusers", "transformers", "insightface", "onnxruntime"}),
    ],
)
def test_package_does_not_import(package: str, forbidden: set[str]) -> None:
    offenders = {f: sorted(names & forbidden) for f, names in _imported_roots(package).items() if names & forbidden}
    assert offenders == {}


def test_client_side_imports_need_no_torch() -> None:
    code = (
        "import sys\n"
        "import farm, farm.cli, farm.settings, farm.errors, tasks, storage\n"
        "import storage.objects, storage.models, storage.transitions, storage.migrate, storage.db\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'insightface')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == ""
