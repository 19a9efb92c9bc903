"""Job templates: a full valid spec saved under a name, checked when saved and again when a job
is submitted from it with ``--set`` overrides.

- On the control host (the direct mode), through the CLI in a pipe (COLUMNS=60), with a real worker
  on Redis and Postgres: save, list, show, submit with overrides and wait for the render (its
  outputs carry the override), refusals naming the field (an invalid spec, an idempotency_key, a
  bad override), replace, delete.
- Through the API: a template is its project's (another project's is not found; a viewer reads
  but does not save; a member who neither owns it nor manages the project does not replace or
  delete it), and a member submits from it through the API client, into its project.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from farm.errors import Forbidden, NotFound
from farm.job_spec import SpecError
from storage.db import make_engine, make_session_factory, session_scope
from storage.models import Artifact, AuditEvent
from tests.fixtures.api import add_person
from tests.fixtures.farm import farm_cli, text_job

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``farm ARGS`` through a pipe in a 60-column terminal."""
    return farm_cli(env, *args, timeout=600)


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_templates_on_the_control_host(farm_factory, tiny_models, pg_url, redis_url, tmp_path: Path) -> None:
    farm = farm_factory(broker=redis_url, db_url=pg_url)
    name = f"cube-{uuid.uuid4().hex[:6]}"
    spec = text_job(tiny_models["sd15"], prompts=["a red cube"], count=1, steps=2, output_prefix="templated")

    invalid = cli(farm.env, "templates", "save", name, str(_write(tmp_path / "bad.yaml", {**spec, "steps": 500})))
    assert invalid.returncode == 2 and "steps: " in invalid.stderr, invalid.stderr
    keyed = _write(tmp_path / "keyed.yaml", {**spec, "idempotency_key": "once"})
    refused = cli(farm.env, "templates", "save", name, str(keyed))
    assert refused.returncode == 2 and "idempotency_key: a template is used many times" in refused.stderr

    saved = cli(farm.env, "templates", "save", name, str(_write(tmp_path / "t.yaml", spec)))
    assert saved.returncode == 0, saved.stderr
    assert f"saved template {name} (text_to_image) in project default" in " ".join(saved.stdout.split())
    listed = cli(farm.env, "templates", "list").stdout.splitlines()
    assert listed[0].split("\t") == ["project", "name", "kind", "owner", "updated"]
    assert any(line.split("\t")[:4] == ["default", name, "text_to_image", "admin"] for line in listed[1:])
    shown = cli(farm.env, "templates", "show", name).stdout
    assert yaml.safe_load(shown) == spec  # the spec as saved (the header line is a comment)

    no_file = cli(farm.env, "submit")
    assert no_file.returncode == 2 and "give a spec FILE or --template NAME" in no_file.stderr
    bad = cli(farm.env, "submit", "--template", name, "--set", "steps=many")
    assert bad.returncode == 2 and "steps: " in bad.stderr and "Traceback" not in bad.stderr
    bad_path = cli(farm.env, "submit", "--template", name, "--set", "prompts.3=x")
    assert bad_path.returncode == 2 and "prompts.3: index out of range" in bad_path.stderr

    farm.start_worker(["farm.control", "farm.gpu.sd15"], name="templates-worker")
    done = cli(
        farm.env, "submit", "--template", name, "--set", "prompts.0=a blue sphere", "--set", "seeds=[11]", "--wait"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job = done.stdout.split("submitted job ")[1].split()[0]
    engine = make_engine(pg_url)
    with session_scope(make_session_factory(engine)) as session:
        made = session.execute(
            select(Artifact.seed, Artifact.params["prompt"].as_string()).where(Artifact.job_id == uuid.UUID(job))
        ).all()
    engine.dispose()
    assert made == [(11, "a blue sphere")]

    replaced = cli(farm.env, "templates", "save", name, str(_write(tmp_path / "t2.yaml", {**spec, "steps": 3})))
    assert "replaced template" in replaced.stdout
    assert yaml.safe_load(cli(farm.env, "templates", "show", name).stdout)["steps"] == 3
    assert cli(farm.env, "templates", "delete", name).returncode == 0
    gone = cli(farm.env, "templates", "show", name)
    assert gone.returncode == 1 and f"no template {name!r}" in gone.stderr


def test_templates_belong_to_their_project(farm_factory, api_server_factory, tiny_models, pg_url, redis_url):
    farm = farm_factory(broker=redis_url, db_url=pg_url)  # no worker: submitted jobs wait
    server = api_server_factory(farm)
    tag = uuid.uuid4().hex[:6]
    studio = f"studio-{tag}"
    alice = add_person(farm, server, f"alice-{tag}", "member", project=studio)
    bob = add_person(farm, server, f"bob-{tag}", "member", project=f"elsewhere-{tag}")
    carol = add_person(farm, server, f"carol-{tag}", "viewer", project=studio)
    dave = add_person(farm, server, f"dave-{tag}", "member", project=studio)
    spec = text_job(tiny_models["sd15"], output_prefix=f"tpl-{tag}")

    with alice.client() as client:
        with pytest.raises(SpecError) as refused:  # refused by the client before any request
            client.save_template("portrait", {**spec, "width": 100})
        assert refused.value.problems[0][0] == "width"
        saved = client.save_template("portrait", spec)
        assert (saved["name"], saved["project"], saved["owner"], saved["created"]) == (
            "portrait",
            studio,
            alice.name,
            True,
        )
        assert [t["name"] for t in client.templates()] == ["portrait"]
    with alice.http() as http:  # a path on the caller's machine is for the client to upload, never the server's
        local = http.put("/v1/templates/local", json={"spec": {**spec, "negative_prompt": {"path": "/etc/hostname"}}})
        assert local.status_code == 422 and local.json()["error"]["problems"][0]["field"] == "spec.negative_prompt"

    with bob.client() as client:
        assert client.templates() == []
        with pytest.raises(NotFound):
            client.template("portrait")
        with pytest.raises(NotFound):
            client.submit_template("portrait")
        mine = client.save_template("portrait", spec)  # the same name in another project is another template
        assert mine["project"] == f"elsewhere-{tag}"
    with carol.client() as client:
        assert client.template("portrait")["spec"] == spec
        with pytest.raises(Forbidden, match="viewers may not save templates"):
            client.save_template("portrait", spec)
    with dave.client() as client:
        with pytest.raises(Forbidden, match="not yours"):
            client.save_template("portrait", {**spec, "steps": 4})
        with pytest.raises(Forbidden, match="not yours"):
            client.delete_template("portrait")
        with pytest.raises(SpecError) as refused:
            client.submit_template("portrait", {"guidance": 99})
        assert refused.value.problems[0][0] == "guidance"
        done = client.submit_template("portrait", {"prompts": ["one prompt"], "steps": 5})
        summary = client.get(done.job_id)
    assert (summary["owner"], summary["project"], summary["items_total"]) == (dave.name, studio, 2)

    through_cli = cli(alice.env(), "templates", "list")
    assert through_cli.returncode == 0, through_cli.stderr
    assert through_cli.stdout.splitlines()[1].split("\t")[:4] == [studio, "portrait", "text_to_image", alice.name]
    submitted = cli(alice.env(), "submit", "--template", "portrait", "--set", "seeds=[5]")
    assert submitted.returncode == 0 and "submitted job" in submitted.stdout, submitted.stderr
    with alice.client() as client:
        assert client.delete_template("portrait") == {"name": "portrait", "deleted": True}
        assert client.templates() == []

    engine = make_engine(pg_url)
    with session_scope(make_session_factory(engine)) as session:
        audit = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.status).where(
                AuditEvent.action.like("template.%"), AuditEvent.actor.like(f"%-{tag}")
            )
        ).all()
    engine.dispose()
    assert sorted(audit) == sorted(
        [
            (alice.name, "template.save", 201),
            (alice.name, "template.save", 422),
            (bob.name, "template.save", 201),
            (carol.name, "template.save", 403),
            (dave.name, "template.save", 403),
            (dave.name, "template.delete", 403),
            (alice.name, "template.delete", 200),
        ]
    )
