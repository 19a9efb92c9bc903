"""Every example job file a new user may submit is a valid spec."""

from pathlib import Path

import pytest

from farm.specs import load_spec_file

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.y*ml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path: Path) -> None:
    assert load_spec_file(path).item_count() > 0


def test_there_are_examples() -> None:
    assert EXAMPLES
