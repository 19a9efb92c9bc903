"""One descriptor per job kind, one registry: a kind added the way docs/architecture.md says
(a spec module, a runner module, one registration line, nothing in the farm edited) is accepted
at submit, sharded, and rendered by the real worker runtime on a tiny model."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from farm.errors import FarmError
from farm.finalizer import finalize
from farm.kinds import KINDS, JobKind, job_kind, known_kinds, register_kind, unregister_kind
from farm.sharding import plan_shards
from farm.specs import SpecError, parse_spec
from storage.db import session_scope
from storage.models import Artifact, Job
from tests.fixtures.farm import ROOT

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def recipe_block(name: str) -> str:
    found = re.search(rf"<!-- kind-recipe: {name} -->\n```python\n(.*?)```", ARCHITECTURE.read_text(), re.S)
    assert found, f"docs/architecture.md lost its {name} block"
    return found.group(1)


@pytest.fixture
def recipe_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The recipe's kind, written to two modules of a temporary folder and registered by its line."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "guidance_sweep.py").write_text(recipe_block("spec"))
    (folder / "guidance_sweep_runner.py").write_text(recipe_block("runner"))
    monkeypatch.syspath_prepend(str(folder))
    import guidance_sweep  # written just now

    register = recipe_block("register").strip()
    assert len(register.splitlines()) == 1, "registering a kind is one line"
    exec(register, {"register_kind": register_kind, "guidance_sweep": guidance_sweep})
    try:
        yield guidance_sweep
    finally:
        unregister_kind("guidance_sweep")
        for name in ("guidance_sweep", "guidance_sweep_runner"):
            sys.modules.pop(name, None)


def test_every_built_in_kind_has_one_descriptor() -> None:
    renders = ["face_identity", "temporal_video", "text_to_image"]
    steps = ["contact_sheet", "encode", "package", "upscale"]  # post-steps: no model, farm.cpu
    assert known_kinds() == sorted(renders + steps)
    for name, kind in KINDS.items():
        assert kind.name == name == kind.spec.model_fields["kind"].default
        assert callable(kind.runner()), name  # the worker side imports
    assert [name for name, kind in KINDS.items() if kind.bulk] == ["text_to_image", "face_identity"]
    assert [name for name, kind in KINDS.items() if not kind.runtime_applies_patches] == ["face_identity"]
    assert job_kind("temporal_video").ext == "mp4"
    assert sorted(name for name, kind in KINDS.items() if kind.step) == steps
    for name in steps:  # a step's default spec loads no model and goes to farm.cpu
        spec = parse_spec({"kind": name, "source_job": str(uuid.UUID(int=1))})
        assert (job_kind(name).model_of(spec), job_kind(name).queue_for(spec)) == (None, "farm.cpu")
    with pytest.raises(FarmError, match="unknown job kind 'nope'; known kinds: contact_sheet, encode, face_identity"):
        job_kind("nope")
    with pytest.raises(TypeError, match="not a JobSpec subclass"):
        JobKind(spec=dict, items=iter, runner=dict)  # type: ignore[arg-type]


def test_kind_modules_carry_the_kind_name_and_spec_sides_need_no_torch() -> None:
    shared = ("__init__", "base", "step")  # step: what the step kinds share (StepSpec)
    spec_side = sorted(p.stem for p in (ROOT / "farm" / "kinds").glob("*.py") if p.stem not in shared)
    runners = sorted(p.stem for p in (ROOT / "farm" / "worker" / "kinds").glob("*.py") if p.stem != "__init__")
    assert spec_side == sorted(KINDS)
    assert all(any(r == k or r.startswith(f"{k}_") for k in KINDS) for r in runners), runners
    assert set(spec_side) <= set(runners)
    code = "import sys, farm.kinds, farm.specs; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_kind_added_by_the_recipe_is_submitted_and_rendered(recipe_kind, in_process_worker, tiny_models) -> None:
    spec_data = {
        "kind": "guidance_sweep",
        "model": str(tiny_models["sd15"]),
        "family": "sd15",
        "prompts": ["a lighthouse", "a red cube"],
        "seeds": [7],
        "scales": [1.0, 5.0],
        "guidance_rescale": 0.3,
        "steps": 2,
        "width": 64,
        "height": 64,
        "shard_size": 3,
    }
    spec = parse_spec(spec_data)
    assert type(spec) is recipe_kind.GuidanceSweepSpec and spec.item_count() == 4
    assert [len(plan.items) for plan in plan_shards(spec, "j")] == [3, 1]
    with pytest.raises(SpecError, match=r"scales: List should have at least 1 item"):
        parse_spec({**spec_data, "scales": []})
    with pytest.raises(SpecError, match="guidance_sweep jobs run on sd15 or sdxl models, not svd"):
        parse_spec({**spec_data, "family": "svd"})

    worker = in_process_worker()
    job_id, outcomes = worker.run(spec_data)
    assert outcomes == ["succeeded", "succeeded"]
    done = finalize(worker.res.session_factory, worker.res.store, job_id)  # manifest and contact sheet too
    assert done.status == "succeeded" and done.outputs_written
    with session_scope(worker.res.session_factory) as session:
        assert session.get(Job, job_id).status == "succeeded"
        rows = select(Artifact.key).where(Artifact.job_id == job_id).order_by(Artifact.item_index)
        keys = list(session.scalars(rows))
    recorded = [json.loads(Image.open(io.BytesIO(worker.res.store.get_bytes(k))).text["farm"]) for k in keys]
    assert [(r["prompt"], r["guidance"]) for r in recorded] == [
        ("a lighthouse", 1.0),
        ("a lighthouse", 5.0),
        ("a red cube", 1.0),
        ("a red cube", 5.0),
    ]
    assert {r["guidance_rescale"] for r in recorded} == {0.3}
    outputs = worker.outputs(job_id)
    assert outputs[0][1] != outputs[1][1]  # another guidance scale renders another image
