"""Print the project's requirements (the base install plus the named extras), one per line.

The Dockerfiles install these before they copy the source, so a source change does not
reinstall the dependencies:

    python docker/requirements.py pyproject.toml gpu > requirements.txt
    pip install --no-cache-dir -c docker/constraints.txt -r requirements.txt

Requirements already installed (torch, in the worker image) are left as they are.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {', '.join(unknown)}; {pyproject} has {', '.join(optional)}")
    found: list[str] = []
    for requirement in [*project["dependencies"], *(r for extra in extras for r in optional[extra])]:
        if requirement not in found:
            found.append(requirement)
    return found


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: requirements.py PYPROJECT [EXTRA ...]")
    print("\n".join(requirements(Path(argv[0]), argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
