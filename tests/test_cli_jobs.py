"""Job commands as a person uses them, through a pipe and in a narrow terminal, on the embedded
farm with a real worker: id prefixes, exit codes, words instead of refusals, why a job waits,
results with their columns and downloads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from farm.errors import NotFound, UserError
from farm.job_refs import resolve_job_id
from tests.fixtures.database import default_owner
from tests.fixtures.farm import ROOT, text_job
from tests.fixtures.services import wait_for

pytestmark = pytest.mark.slow


def run(farm, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """``farm ARGS`` through a pipe, or in a pseudo-terminal ``columns`` wide."""
    cmd = [sys.executable, "-m", "farm", *args]
    if columns is not None:
        inner = " ".join(f"'{part}'" for part in cmd)
        cmd = ["script", "-qec", f"stty cols {columns} rows 50; {inner}", "/dev/null"]
    return subprocess.run(cmd, env=farm.env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _spec(tmp_path: Path, model: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(text_job(model, steps=2, **overrides)))
    return path


def test_job_commands_through_a_pipe(farm_factory, tiny_models, tmp_path: Path) -> None:
    farm = farm_factory()
    spec = _spec(tmp_path, tiny_models["sd15"], "job", idempotency_key=f"cli-{uuid.uuid4().hex[:8]}")

    waiting = run(farm, "submit", str(spec))
    assert waiting.returncode == 0, waiting.stderr
    job_id = waiting.stdout.split("submitted job ")[1].split()[0]
    prefix = job_id[:8]
    status = run(farm, "status", prefix)
    assert status.returncode == 0, status.stderr
    assert "waiting: not scheduled yet: no live worker consumes farm.control" in status.stdout
    assert "0/None" not in status.stdout and "not split into shards yet" in status.stdout

    again = run(farm, "submit", str(spec))
    assert f"already submitted as job {job_id} (pending)" in again.stdout, again.stdout

    farm.start_worker(["farm.control"], name="control")
    wait_for(lambda: "no live worker consumes it" in run(farm, "status", prefix).stdout, 60, "the queue reason")
    queued = run(farm, "status", prefix).stdout
    assert "waiting: 3 shard(s) queued on farm.gpu.sd15: no live worker consumes it" in queued, queued

    farm.start_worker(["farm.gpu.sd15"], name="gpu")
    done = run(farm, "wait", prefix)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"job {job_id}" in done.stdout  # one unbroken line holds the whole id

    listed = run(farm, "status")
    assert listed.stdout.splitlines()[0].split("\t")[:3] == ["id", "status", "kind"]
    assert f"{prefix}\tsucceeded\ttext_to_image" in listed.stdout
    as_json = json.loads(run(farm, "status", prefix, "--json").stdout)
    assert as_json["status"] == "succeeded" and as_json["previews"]["manifest"]

    nothing = run(farm, "retry", prefix)
    assert nothing.returncode == 0 and "nothing to retry" in nothing.stdout, nothing.stdout + nothing.stderr
    late = run(farm, "cancel", prefix)
    assert late.returncode == 0 and f"job {job_id}: already succeeded" in late.stdout, late.stdout + late.stderr

    results = run(farm, "results", prefix, "--download", str(tmp_path / "out"))
    lines = results.stdout.splitlines()
    assert lines[0].split("\t") == ["item", "kind", "prompt", "seed", "frame", "type", "where"]
    first = lines[1].split("\t")
    assert first[1:4] == ["text_to_image", "a red cube", "7"] and first[5] == "png"
    assert Path(first[6]).is_file()
    assert (tmp_path / "out" / "contact_sheet.png").is_file() and (tmp_path / "out" / "manifest.json").is_file()

    unknown = run(farm, "status", "ffffffff")
    assert unknown.returncode == 1 and "no job id starts with 'ffffffff'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    nonsense = run(farm, "retry", "not-a-job")
    assert nonsense.returncode == 1 and "no bulk job is named 'not-a-job' either" in nonsense.stderr


def test_submit_wait_exits_non_zero_unless_the_job_succeeds(farm_factory, tmp_path: Path) -> None:
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="all")
    refused = run(farm, "submit", str(_spec(tmp_path, "./no-such-model", "absent", prompts=["x"], count=1)))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        "model: './no-such-model' (relative to " in refused.stderr
        and "does not exist on this machine" in refused.stderr
    )
    assert run(farm, "status", "--json").stdout.strip() == "[]", "nothing stored for a refused spec"
    out = run(
        farm,
        "submit",
        str(_spec(tmp_path, _broken_model(tmp_path / "broken"), "broken", prompts=["x"], count=1)),
        "--wait",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failed" in out.stdout
    assert "Exit codes" in run(farm, "submit", "--help").stdout


def _broken_model(folder: Path) -> Path:
    """A folder that looks like a diffusers model to the submit check but does not load."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def test_a_narrow_terminal_folds_no_id_path_or_error(farm_factory, tmp_path: Path) -> None:
    if shutil.which("script") is None:
        pytest.skip("util-linux script is not installed")
    farm = farm_factory()
    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="all")
    missing = _broken_model(tmp_path / "a-model-folder-with-a-rather-long-name-that-does-not-load")
    spec = _spec(tmp_path, missing, "narrow", prompts=["x"], count=1)
    job_id = run(farm, "submit", str(spec)).stdout.split("submitted job ")[1].split()[0]
    run(farm, "wait", job_id[:8])
    out = run(farm, "status", job_id[:8], columns=50)
    text = out.stdout.replace("\r", "")
    assert job_id in text, text  # the whole id on one line
    error_lines = [line for line in text.splitlines() if str(missing.name) in line]
    assert error_lines, text  # the error names the folder, unbroken
    manifest = [line for line in text.splitlines() if line.startswith("manifest: ")]
    assert manifest and manifest[0].endswith(f"/{job_id}/manifest.json"), text  # the URL on its line, whole


def test_job_prefixes_resolve_once_and_refuse_ambiguity(session_factory) -> None:
    from storage.db import session_scope
    from storage.models import Job

    ids = [uuid.UUID("abcd1234" + "0" * 24), uuid.UUID("abcd5678" + "0" * 24), uuid.UUID("12345678" + "f" * 24)]
    with session_scope(session_factory) as session:
        owner = default_owner(session)
        for job_id in ids:
            session.add(
                Job(id=job_id, kind="text_to_image", family="sd15", spec={}, spec_hash="0", output_prefix="p", **owner)
            )
    with session_scope(session_factory) as session:
        assert resolve_job_id(session, "1234") == ids[2]
        assert resolve_job_id(session, "ABCD1234") == ids[0]
        assert resolve_job_id(session, str(ids[1])) == ids[1]
        with pytest.raises(UserError, match="'abcd' is ambiguous: it matches abcd1234, abcd5678"):
            resolve_job_id(session, "abcd")
        with pytest.raises(NotFound, match="no job id starts with '9999'"):
            resolve_job_id(session, "9999")
        with pytest.raises(UserError, match="at least its first 4 hex digits"):
            resolve_job_id(session, "ab")


def test_worker_refuses_unknown_queues_and_warns_without_a_control_worker(farm_factory) -> None:
    farm = farm_factory()
    typo = run(farm, "worker", "--queues", "farm.control,farm.gpu.sd51")
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "--queues: unknown queue(s) 'farm.gpu.sd51'; known: farm.control, farm.gpu.sd15" in typo.stderr
    gpu = farm.start_worker(["farm.gpu.sd15"], name="lonely")
    assert "warning: no live worker consumes farm.control" in gpu.log.read_text()
    farm.start_worker(["farm.control"], name="control")
    second = farm.start_worker(["farm.gpu.sd15"], name="second")
    assert "no live worker consumes farm.control" not in second.log.read_text()


def test_racing_cancel_and_retry_answer_in_words(tmp_path: Path) -> None:
    """A cancel that lands after every shard ended (the finalize still on its way) leaves the job
    succeeded; cancelling or retrying again says what is, and a cancelled job is not retried."""
    from farm.client import FarmClient
    from farm.settings import FarmSettings
    from storage import migrate
    from storage.db import session_scope
    from storage.leases import claim_shard, finish_shard
    from storage.status import ShardStatus

    settings = FarmSettings(_env_file=None, data_dir=tmp_path / "data")
    migrate.upgrade(settings.database_url)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    with FarmClient(settings) as client:
        done = client.submit(text_job(model, prompts=["a"], count=2, shard_size=1))
        other = client.submit(text_job(model, prompts=["b"], count=1))
        from farm.scheduler import schedule_job

        with session_scope(client._sessions) as session:
            shards = schedule_job(session, done)
            schedule_job(session, other)
        with session_scope(client._sessions) as session:
            for d in shards:
                finish_shard(session, claim_shard(session, d.shard_id, "w", 60), ShardStatus.SUCCEEDED)
        finishing = client.cancel(str(done)[:8])
        assert finishing["cancel"] == "finishing" and finishing["status"] == "succeeded"
        assert client.cancel(done)["cancel"] == "already succeeded"
        assert client.retry(done)["note"].startswith("nothing to retry: job")
        assert client.cancel(other)["cancel"] == "cancelled"
        assert client.cancel(other)["cancel"] == "already cancelled"
        refused = client.retry(other)
        assert refused["requeued"] == 0 and "was cancelled: nothing re-queued" in refused["note"]
