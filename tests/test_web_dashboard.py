"""The web dashboard in a real browser: Debian's chromium driven by Playwright, against a real
``farm api`` process, a real worker and a tiny model, on Postgres and Redis.

People log in with a password, submit through the API, watch a job's shard grid go from queued
to done without reloading, open a thumbnail, cancel a running job and retry several jobs from
the pages; another project's user never sees the job; a prompt holding ``<script>`` is shown as
text; a POST without the CSRF token is refused. With ``FARM_SCREENSHOTS=DIR`` the jobs, job and
workers pages are saved there as PNGs (``docs/`` keeps the README's)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.fixtures.api import add_person
from tests.fixtures.farm import text_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GPU_QUEUES = ["farm.gpu.sd15"]
XSS = "<script>alert(1)</script>"
VIEWPORT = {"width": 1100, "height": 760}


def set_password(farm, name: str, password: str) -> None:
    from storage.logins import set_password as store

    with farm.session() as session:
        store(session, name, password)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, tiny_models, pg_database_factory, redis_url):
    """A farm on Postgres and Redis with its API server, a control worker (it splits jobs into
    shards) and two people in two projects; the render worker starts when a test asks (so a job's
    shards can be seen waiting first)."""
    from storage import migrate
    from tests.fixtures.api import ApiServer
    from tests.fixtures.farm import Farm, _base_env

    tmp = tmp_path_factory.mktemp("dashboard")
    env = {**_base_env(tmp), "FARM_BROKER__URL": redis_url, "FARM_DB__URL": pg_database_factory()}
    farm = Farm(env, tmp)
    migrate.upgrade(farm.settings().database_url)
    farm.start_worker(["farm.control"], name="dash-control")
    server = ApiServer(farm, tmp / "api.log", FARM_API__EVENTS_POLL_S="0.3").wait_ready()
    alice = add_person(farm, server, "alice", "member", project="studio")
    bob = add_person(farm, server, "bob", "member", project="elsewhere")
    set_password(farm, "alice", "alice's long password")
    set_password(farm, "bob", "bob's long password")
    try:
        yield farm, server, alice, bob, tiny_models["sd15"]
    finally:
        server.stop()
        farm.stop()


def worker_up(farm) -> None:
    if not any(w.name == "dash-worker" for w in farm.workers):
        farm.start_worker(GPU_QUEUES, name="dash-worker")


def logged_in(chromium, server, name: str, password: str):
    context = chromium.new_context(base_url=server.url, viewport=VIEWPORT, color_scheme="light")
    page = context.new_page()
    page.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message!r}"))
    page.goto("/jobs")
    assert "/login" in page.url
    page.fill('input[name="name"]', name)
    page.fill('input[name="password"]', password)
    page.click('button[type="submit"]')
    page.wait_for_url("**/jobs")
    return context, page


def submit(person, spec: dict) -> str:
    with person.http() as http:
        answer = http.post("/v1/jobs", json={"spec": spec})
        assert answer.status_code == 201, answer.text
        return answer.json()["job_id"]


def wait_status(person, job: str, wanted: set[str], timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    with person.http() as http:
        while time.monotonic() < deadline:
            summary = http.get(f"/v1/jobs/{job}").json()
            if summary["status"] in wanted:
                return summary
            time.sleep(0.3)
    raise AssertionError(f"job {job} still {summary['status']} after {timeout}s")


def wait_shards(person, job: str, timeout: float = 60.0) -> None:
    """Until the control worker has split the job into its 3 shards and sent its queue's window
    (no render worker yet: 2 on the broker, the third waits in the database)."""
    deadline = time.monotonic() + timeout
    with person.http() as http:
        while http.get(f"/v1/jobs/{job}").json()["shards_by_status"] != {"queued": 2, "pending": 1}:
            assert time.monotonic() < deadline, f"job {job} not split into shards in {timeout}s"
            time.sleep(0.2)


def shot(page, name: str) -> None:
    target = os.environ.get("FARM_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        height = min(VIEWPORT["height"], page.evaluate("document.body.scrollHeight") + 16)
        clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
        page.screenshot(path=str(Path(target) / f"dashboard-{name}.png"), clip=clip)


def test_watch_a_job_render_live_and_open_a_thumbnail(dashboard, chromium) -> None:
    farm, server, alice, _, model = dashboard
    spec = text_job(model, prompts=["a red cube", XSS, "a green cone"], output_prefix="live-grid")
    job = submit(alice, spec)
    context, page = logged_in(chromium, server, "alice", "alice's long password")
    try:
        wait_shards(alice, job)
        page.goto(f"/jobs/{job}")
        cells = page.locator("#shard-grid .cell")
        assert cells.count() == 3
        # no GPU worker yet: the broker holds the queue's window (2), the database the third shard
        statuses = sorted(cells.nth(i).get_attribute("data-status") for i in range(3))
        assert statuses == ["pending", "queued", "queued"]
        assert XSS in page.inner_text("#spec")  # shown as text, never run (a dialog fails the test)
        page.evaluate("window.stillTheSamePage = true")

        worker_up(farm)  # now the farm renders it: the grid follows without a reload
        page.wait_for_function(
            "() => [...document.querySelectorAll('#shard-grid .cell')].every(c => c.dataset.status === 'succeeded')",
            timeout=180_000,
        )
        assert page.evaluate("window.stillTheSamePage") is True
        page.wait_for_function("() => document.getElementById('job-status').textContent === 'succeeded'")
        assert page.inner_text("#job-items") == "6/6"
        page.wait_for_selector("#thumbs a.thumb img", timeout=30_000)
        assert page.locator("#thumbs a.thumb").count() == 6
        page.locator("#shard-grid .cell").first.click()
        assert "worker: dash-worker" in page.inner_text("#shard-detail")
        deadline = time.monotonic() + 60
        while True:  # the finished job's page as anyone opening it sees it, once the finalizer wrote the sheet
            page.reload()
            if page.locator("#contact-sheet-link").count() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert page.locator("#contact-sheet-link").count() == 1
        shot(page, "job")
        page.emulate_media(color_scheme="dark")
        shot(page, "job-dark")
        page.emulate_media(color_scheme="light")

        page.locator("#thumbs a.thumb").first.click()
        page.wait_for_url(f"**/v1/jobs/{job}/objects/**")
        assert page.evaluate("document.images.length === 1 && document.images[0].naturalWidth") == 64

        page.goto("/jobs")
        assert page.locator(f'tr[data-job="{job}"] .badge').inner_text() == "succeeded"
    finally:
        context.close()


def test_cancel_a_running_job_from_its_page(dashboard, chromium) -> None:
    farm, server, alice, _, model = dashboard
    worker_up(farm)
    prompts = [f"a slow scene {n}" for n in range(12)]
    job = submit(alice, text_job(model, prompts=prompts, count=6, steps=50, output_prefix="to-cancel"))
    context, page = logged_in(chromium, server, "alice", "alice's long password")
    try:
        wait_status(alice, job, {"running"})
        deadline = time.monotonic() + 60
        while True:  # the worker's row names the job once it holds one of its shards
            page.goto("/workers")
            if page.locator(f'table.workers a[href="/jobs/{job}"]').count() == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "dash-worker" in page.inner_text("table.workers")
        assert page.locator(f'table.workers a[href="/jobs/{job}"]').count() == 1
        shot(page, "workers")
        page.goto(f"/jobs/{job}")
        page.wait_for_selector('#shard-grid .cell[data-status="running"], #shard-grid .cell[data-status="succeeded"]')
        page.click("#cancel-job")
        page.wait_for_url(f"**/jobs/{job}")
        assert page.inner_text("#job-status") == "cancelled"
        assert wait_status(alice, job, {"cancelled"})["status"] == "cancelled"
        settled = "['cancelled', 'succeeded', 'failed'].includes(c.dataset.status)"
        page.wait_for_function(  # the running shards stop at their next step; the grid follows
            f"() => [...document.querySelectorAll('#shard-grid .cell')].every(c => {settled})", timeout=60_000
        )
    finally:
        context.close()


def test_retry_several_jobs_at_once(dashboard, chromium) -> None:
    from storage.db import make_engine, make_session_factory, session_scope
    from storage.models import AuditEvent, Job, Shard

    farm, server, alice, _, model = dashboard
    worker_up(farm)
    jobs = [submit(alice, text_job(model, output_prefix=f"retry-{n}", base_seed=100 + n)) for n in range(2)]
    for job in jobs:
        wait_status(alice, job, {"succeeded"})
    engine = make_engine(farm.settings().database_url)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:  # as if a shard of each had failed for good
        for job in jobs:
            job_id = uuid.UUID(job)
            session.execute(
                update(Shard)
                .where(Shard.job_id == job_id, Shard.index == 0)
                .values(status="failed", error="boom", errors=["attempt 1 by w: boom"])
            )
            session.execute(update(Job).where(Job.id == job_id).values(status="partial"))
    context, page = logged_in(chromium, server, "alice", "alice's long password")
    try:
        page.goto("/jobs?q=retry-")
        for job in jobs:
            page.check(f'input[name="job"][value="{job}"]')
        page.click("#retry-selected")
        page.wait_for_url("**/jobs?done=retry*")
        assert "retry: 2 jobs done" in page.inner_text("#action-note")
        for job in jobs:
            assert wait_status(alice, job, {"succeeded"})["status"] == "succeeded"
        page.goto("/jobs")
        assert page.locator("tbody tr[data-job]").count() >= 4
        shot(page, "jobs")
    finally:
        context.close()
    with session_scope(sessions) as session:
        rows = session.execute(
            select(AuditEvent.target, AuditEvent.status).where(
                AuditEvent.action == "job.retry", AuditEvent.actor == "alice"
            )
        ).all()
    engine.dispose()
    assert sorted(rows) == sorted((job, 200) for job in jobs)


def test_rerun_a_failed_job_from_its_page(dashboard, chromium, tmp_path) -> None:
    """A job whose model does not load fails on the worker; its page offers "Re-run" and "Re-run
    failed"; the latter opens a new job with only the failed items that names its parent."""
    farm, server, alice, _, _ = dashboard
    worker_up(farm)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")  # a diffusers folder to the eye, that does not load
    spec = text_job(broken, prompts=["a lost cube"], count=2, shard_size=1, output_prefix="rerun-page")
    job = submit(alice, spec)
    assert wait_status(alice, job, {"failed"})["status"] == "failed"
    context, page = logged_in(chromium, server, "alice", "alice's long password")
    try:
        page.goto(f"/jobs/{job}")
        assert page.locator("#rerun-job").is_visible() and page.locator("#rerun-failed").is_visible()
        assert page.locator("#parent-job").count() == 0
        shot(page, "job-rerun")
        page.click("#rerun-failed")
        page.wait_for_url(lambda url: "/jobs/" in url and job not in url)
        child = page.url.rsplit("/", 1)[-1]
        assert job[:8] in page.inner_text("#parent-job")
        assert "only_items:\n- 0\n- 1" in page.inner_text("#spec")
        shot(page, "job-rerun-child")
        page.click("#parent-job a")
        page.wait_for_url(f"**/jobs/{job}")
    finally:
        context.close()
    with alice.http() as http:
        summary = http.get(f"/v1/jobs/{child}").json()
    assert (summary["parent_job_id"], summary["owner"], summary["items_total"]) == (job, "alice", 2)
    wait_status(alice, child, {"failed"})  # the same broken model: it fails too, and is done


def test_another_project_never_sees_the_job_and_csrf_is_required(dashboard, chromium) -> None:
    _, server, alice, _, model = dashboard
    job = submit(alice, text_job(model, output_prefix="private", base_seed=999))
    context, page = logged_in(chromium, server, "bob", "bob's long password")
    try:
        page.goto("/jobs")
        assert job not in page.content()
        page.goto(f"/jobs?q={job[:8]}")
        assert job not in page.content()
        for path in (f"/jobs/{job}", f"/jobs/{job[:8]}"):
            answer = page.goto(path)
            assert answer.status == 404 and "Not found" in page.inner_text("h1")
        assert page.request.get(f"/v1/jobs/{job}/events").status == 404
        assert page.request.get(f"/v1/jobs/{job}").status == 404
    finally:
        context.close()

    context, page = logged_in(chromium, server, "alice", "alice's long password")
    try:  # alice's own browser, her session cookie sent, but no CSRF token: refused
        for path in (f"/jobs/{job}/cancel", "/jobs/actions", "/logout"):
            refused = page.request.post(path, form={"action": "cancel", "job": job}, max_redirects=0)
            assert refused.status == 403, path
        assert page.request.post(f"/v1/jobs/{job}/cancel").status == 403
        page.goto(f"/jobs/{job}")
        assert page.inner_text("#job-status") != "cancelled"
    finally:
        context.close()
