"""Every example job file a new user may submit is a valid spec (input images uploaded the way
``farm submit`` does, into a scratch store)."""

from pathlib import Path

import pytest

from farm.inputs import upload_inputs
from farm.spec_files import read_spec_file
from farm.specs import parse_spec
from storage.objects.local import LocalStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.y*ml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path: Path, tmp_path: Path) -> None:
    data = upload_inputs(read_spec_file(path), LocalStore(tmp_path), path.parent)  # relative to the file
    assert parse_spec(data).item_count() > 0


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "text_to_image.yaml",
        "temporal_video.yaml",
        "face_identity.yaml",
        "instantid.yaml",
    }


def test_bulk_example_rows_make_valid_jobs() -> None:
    from farm.bulk import group_spec
    from farm.bulk_manifest import read_manifest

    base = read_spec_file(ROOT / "examples" / "bulk_base.yaml")
    rows = read_manifest((ROOT / "examples" / "bulk_rows.jsonl").read_bytes(), "bulk_rows.jsonl")
    assert len(rows) == 4 and len({r.group for r in rows}) == 2
    for row in rows:
        assert parse_spec(group_spec(base, row)).family == "sd15"
