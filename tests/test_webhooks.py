"""Job webhooks: the signature, the address rules, and deliveries from the outbox to a real
loopback HTTP receiver (``http.server`` in a thread): retries with backoff, a receiver that comes
back, refused private addresses, no redirects, a deliverer killed mid-delivery, the CLI and the
API, and a job run by real worker processes reporting started before succeeded."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from farm.bulk import submit_bulk
from farm.bulk_manifest import read_manifest
from farm.errors import ConfigError
from farm.job_spec import SpecError
from farm.scheduler import submit_job
from farm.settings import FarmSettings, WebhooksSettings, load_settings
from farm.specs import parse_spec
from farm.webhook_delivery import WebhookDeliverer
from farm.webhook_urls import AddressPolicy, AddressRefused, refusal
from farm.webhooks import retry_at, signature, signature_matches
from storage import migrate
from storage.db import make_engine, make_session_factory, session_scope
from storage.identity import ensure_default_identity
from storage.models import BulkJob, Job, WebhookEvent, utcnow
from storage.status import JobStatus, WebhookStatus
from storage.transitions import set_job_status
from storage.webhook_outbox import EVENT_TYPES, rotate_webhook_secret, set_user_webhook_url
from tests.fixtures.farm import ROOT, farm_cli

# -- the signature ------------------------------------------------------------------------------


def test_signature_matches_an_independent_hmac() -> None:
    # printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
    reference = "sha256=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
    assert signature("whsec_test", 1700000000, b'{"a":1}') == reference
    assert signature_matches("whsec_test", "1700000000", b'{"a":1}', reference)
    assert not signature_matches("whsec_test", "1700000001", b'{"a":1}', reference)  # another time
    assert not signature_matches("whsec_test", "1700000000", b'{"a":2}', reference)  # another body
    assert not signature_matches("whsec_other", "1700000000", b'{"a":1}', reference)  # another secret


def test_readme_verification_snippet_accepts_the_farms_signature() -> None:
    """The README's snippet, run as written, against a signature the farm made."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- readme-test: webhook-verify -->\n```python\n(.*?)```", readme, re.S)
    assert found, "README lost its webhook-verify example"
    code = found.group(1)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    body, stamp = b'{"type":"job.succeeded"}', str(int(time.time()))
    headers = {"X-Farm-Timestamp": stamp, "X-Farm-Signature": signature("whsec_k", stamp, body)}
    assert namespace["verify"]("whsec_k", headers, body)
    assert not namespace["verify"]("whsec_k", headers, body + b" ")
    old = str(int(time.time()) - 3600)
    assert not namespace["verify"]("whsec_k", {**headers, "X-Farm-Timestamp": old}, body)


# -- the address rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.5", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("fc00::1", "private"),
        ("100.64.0.1", "not public"),
        ("::ffff:10.0.0.5", "private (inside an IPv6 address)"),
        ("::ffff:127.0.0.1", "loopback (inside an IPv6 address)"),
        ("2002:a00:5::1", "private (inside an IPv6 address)"),  # 6to4 of 10.0.0.5
        ("64:ff9b::a9fe:a9fe", "link-local (inside an IPv6 address)"),  # NAT64 of 169.254.169.254
    ],
)
def test_private_and_special_addresses_are_refused(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allow_list_takes_networks_and_names() -> None:
    policy = AddressPolicy.from_entries(["127.0.0.1", "10.1.0.0/16", "hooks.internal"])
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert policy.address_allowed(ipaddress.ip_address("10.1.2.3"))
    assert not policy.address_allowed(ipaddress.ip_address("10.2.0.1"))
    assert not policy.address_allowed(ipaddress.ip_address("127.0.0.2"))
    policy.check_literal("10.1.9.9")
    with pytest.raises(AddressRefused, match=r"10\.2\.0\.1 is a private address"):
        policy.check_literal("10.2.0.1")
    with pytest.raises(ValueError, match="allow_hosts: 'not a host!'"):
        AddressPolicy.from_entries(["not a host!"])
    with pytest.raises(ConfigError, match=r"webhooks\.allow_hosts"):
        load_settings(webhooks={"allow_hosts": ["bad host/"]})


def test_a_name_is_judged_by_what_it_resolves_to() -> None:
    with pytest.raises(AddressRefused, match=r"localhost resolves to .*loopback"):
        AddressPolicy().resolve("localhost", 80)
    assert AddressPolicy.from_entries(["localhost"]).resolve("localhost", 80).is_loopback


BASE_SPEC = {"model": "org/model", "family": "sd15", "prompts": ["a cube"], "seeds": [1]}


@pytest.mark.parametrize(
    ("webhook", "field", "reason"),
    [
        ({"webhook_url": "ftp://example.com/"}, "webhook_url", "http:// or https://"),
        ({"webhook_url": "file:///etc/passwd"}, "webhook_url", "http:// or https://"),
        ({"webhook": {"url": "https://user:pw@example.com/"}}, "webhook.url", "user name or password"),
        ({"webhook": {"url": "https://example.com/" + "a" * 2100}}, "webhook.url", "at most 2048"),
        ({"webhook": {"url": "https:///nohost"}}, "webhook.url", "must name a host"),
        ({"webhook": {"url": "https://example.com/ x"}}, "webhook.url", "spaces"),
        ({"webhook": {"url": "https://example.com/", "events": ["job.done"]}}, "webhook.events[0]", "job.started"),
        ({"webhook": {"url": "https://a.example/"}, "webhook_url": "https://b.example/"}, "webhook_url", "not both"),
    ],
)
def test_bad_webhook_specs_name_the_field(webhook: dict, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE_SPEC, **webhook})
    assert [(f, r) for f, r in caught.value.problems if f == field and reason in r], caught.value.problems


def test_retries_back_off_exponentially_with_jitter_and_end() -> None:
    settings = WebhooksSettings(backoff_base_s=10, backoff_max_s=60, max_attempts=5, max_age_s=3600)
    now = utcnow()
    for attempt, full in ((1, 10), (2, 20), (3, 40), (4, 60)):
        wait = (retry_at(attempt, now, now, settings) - now).total_seconds()
        assert full / 2 <= wait <= full, (attempt, wait)
    assert retry_at(5, now, now, settings) is None  # max_attempts made
    assert retry_at(1, now - timedelta(seconds=3595), now, settings) is None  # past max_age_s


# -- a real receiver ----------------------------------------------------------------------------


class Receiver:
    """A loopback HTTP server that records every request and answers with the next of
    ``answers`` (then 200). ``stall``: requests wait for :attr:`release` before answering."""

    def __init__(self, answers: list[int] | None = None, port: int = 0, stall: bool = False) -> None:
        self.answers = list(answers or [])
        self.requests: list[dict[str, Any]] = []
        self.seen = threading.Event()
        self.release = threading.Event()
        if not stall:
            self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                receiver.seen.set()
                receiver.release.wait(30)
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"nope!" if code >= 300 else b"fine.")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*args: Any, **kwargs: Any) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def hook_db(request, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A migrated database of the test's own (the deliverer claims every due event in it)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'farm-data' / 'farm.db'}"
        (tmp_path / "farm-data").mkdir()
    else:
        url = request.getfixturevalue("pg_database_factory")()
    migrate.upgrade(url)
    engine = make_engine(url)
    yield url, make_session_factory(engine)
    engine.dispose()


LOOPBACK_OK = {"allow_hosts": ["127.0.0.1"], "backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 5}


def new_secret(sessions: Any) -> str:
    with session_scope(sessions) as session:
        admin, _ = ensure_default_identity(session)
        return rotate_webhook_secret(session, admin.id)


def job_with_webhook(sessions: Any, settings: WebhooksSettings, **webhook: Any) -> uuid.UUID:
    spec = parse_spec({**BASE_SPEC, **webhook})
    with session_scope(sessions) as session:
        job, _ = submit_job(session, spec, webhooks=settings)
        return job.id


def run_job(sessions: Any, job_id: uuid.UUID, end: JobStatus = JobStatus.SUCCEEDED) -> None:
    """The job's status changes, through the one module that makes them."""
    with session_scope(sessions) as session:
        set_job_status(session, job_id, JobStatus.RUNNING, started_at=utcnow())
    with session_scope(sessions) as session:
        set_job_status(session, job_id, end)


def events(sessions: Any, job_id: uuid.UUID) -> list[WebhookEvent]:
    with session_scope(sessions) as session:
        rows = list(
            session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id).order_by(WebhookEvent.seq))
        )
        session.expunge_all()
        return rows


def deliver_until(deliverer: WebhookDeliverer, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the deliveries"
        deliverer.run_pass()
        time.sleep(0.05)


def test_500_500_200_is_three_attempts_and_one_signed_delivery(hook_db, receivers, tmp_path: Path) -> None:
    url, sessions = hook_db
    settings = WebhooksSettings(**LOOPBACK_OK)
    secret = new_secret(sessions)
    receiver = receivers([500, 500, 200, 200])
    job_id = job_with_webhook(sessions, settings, webhook={"url": receiver.url, "events": ["job.succeeded"]})
    run_job(sessions, job_id)
    [event] = events(sessions, job_id)  # job.started was not asked for
    deliverer = WebhookDeliverer(settings, sessions)
    deliver_until(deliverer, lambda: events(sessions, job_id)[0].status != WebhookStatus.PENDING)

    [event] = events(sessions, job_id)
    assert (event.status, event.attempts, event.last_http_status) == (WebhookStatus.DELIVERED, 3, 200)
    assert len(receiver.requests) == 3
    assert {r["headers"]["X-Farm-Event-Id"] for r in receiver.requests} == {str(event.id)}  # stable
    assert {r["headers"]["X-Farm-Event"] for r in receiver.requests} == {"job.succeeded"}
    accepted = receiver.requests[-1]
    headers, body = accepted["headers"], accepted["body"]
    assert signature_matches(secret, headers["X-Farm-Timestamp"], body, headers["X-Farm-Signature"])
    assert not signature_matches("whsec_wrong", headers["X-Farm-Timestamp"], body, headers["X-Farm-Signature"])
    payload = json.loads(body)
    assert payload["id"] == str(event.id) and payload["type"] == "job.succeeded"
    assert payload["job"]["id"] == str(job_id) and payload["job"]["status"] == "succeeded"
    assert payload["job"]["output_prefix"] == f"renders/{job_id}"
    assert accepted["headers"]["Host"] == f"127.0.0.1:{receiver.port}"

    # `farm status` shows the delivery, through a pipe in a narrow terminal
    out = cli(tmp_path, "status", str(job_id), FARM_DB__URL=url)
    assert out.returncode == 0, out.stderr
    assert "webhooks:\n  job.succeeded  delivered  3 attempts  HTTP 200\n" in out.stdout, out.stdout
    assert secret not in out.stdout + out.stderr


def test_a_receiver_down_at_the_end_gets_the_event_when_it_is_back(hook_db, receivers) -> None:
    _, sessions = hook_db
    settings = WebhooksSettings(**LOOPBACK_OK)
    new_secret(sessions)
    port = free_port()
    job_id = job_with_webhook(sessions, settings, webhook_url=f"http://127.0.0.1:{port}/hook")
    run_job(sessions, job_id, JobStatus.FAILED)
    deliverer = WebhookDeliverer(settings, sessions)
    deliver_until(deliverer, lambda: events(sessions, job_id)[0].attempts >= 2)  # nobody listens
    started = events(sessions, job_id)[0]
    assert started.status == WebhookStatus.PENDING and "Connect" in (started.last_error or ""), started.last_error
    assert events(sessions, job_id)[1].attempts == 0  # a job's events go in order

    receiver = receivers(port=port)
    deliver_until(deliverer, lambda: all(e.status == WebhookStatus.DELIVERED for e in events(sessions, job_id)))
    assert [r["headers"]["X-Farm-Event"] for r in receiver.requests] == ["job.started", "job.failed"]
    assert [r["headers"]["X-Farm-Event-Id"] for r in receiver.requests] == [str(e.id) for e in events(sessions, job_id)]


def test_a_slow_receiver_holds_up_only_its_own_delivery(hook_db, receivers) -> None:
    """One receiver that does not answer yet and five that do: in one pass (two threads, a batch
    of six) the five are delivered while the slow one still holds its request; no claim ran out."""
    _, sessions = hook_db
    settings = WebhooksSettings(**{**LOOPBACK_OK, "concurrency": 2, "batch": 6, "timeout_s": 20})
    new_secret(sessions)
    slow = receivers(stall=True)
    quick = receivers()
    first = job_with_webhook(sessions, settings, webhook={"url": slow.url, "events": ["job.succeeded"]})
    others = [
        job_with_webhook(sessions, settings, webhook={"url": quick.url, "events": ["job.succeeded"]}) for _ in range(5)
    ]
    for job_id in (first, *others):
        run_job(sessions, job_id)
    reports: list[Any] = []
    deliverer = WebhookDeliverer(settings, sessions)
    passing = threading.Thread(target=lambda: reports.append(deliverer.run_pass()))
    passing.start()
    try:
        assert slow.seen.wait(20), "the slow receiver got nothing"
        # A receiver records a request before the deliverer has written its answer down, so wait
        # on the outbox itself: all five delivered while the slow one still holds its request.
        deadline = time.monotonic() + 30
        while not all(events(sessions, j)[0].status == WebhookStatus.DELIVERED for j in others):
            assert time.monotonic() < deadline, f"only {len(quick.requests)} quick deliveries while one is slow"
            time.sleep(0.05)
        assert not slow.release.is_set() and passing.is_alive()  # all five went by the stalled one
        assert len(quick.requests) == 5
    finally:
        slow.release.set()
        passing.join(30)
    (report,) = reports
    assert (report.delivered, report.failed, report.lost) == (6, 0, 0)
    assert events(sessions, first)[0].attempts == 1 and len(slow.requests) == 1


@pytest.mark.integration
def test_the_database_stopped_mid_pass_still_ends_every_event_delivered(private_postgres, receivers) -> None:
    """A fault no issue names: the database stops while three deliveries are in flight (their
    receiver holds the requests), so their outcomes cannot be written and the pass fails. Once it
    is back, every event ends delivered; the three whose answers were lost are sent again with the
    same event id (at least once), the fourth once."""
    url = private_postgres.create_database("hooks")
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    settings = WebhooksSettings(**{**LOOPBACK_OK, "concurrency": 3, "batch": 10, "timeout_s": 5, "claim_lease_s": 6})
    new_secret(sessions)
    receiver = receivers(stall=True)
    hook = {"url": receiver.url, "events": ["job.succeeded"]}
    jobs = [job_with_webhook(sessions, settings, webhook=hook) for _ in range(4)]
    for job_id in jobs:
        run_job(sessions, job_id)
    failures: list[BaseException] = []

    def first_pass() -> None:
        try:
            WebhookDeliverer(settings, sessions).run_pass()
        except Exception as exc:  # the outcomes could not be written: the database is down
            failures.append(exc)

    passing = threading.Thread(target=first_pass)
    passing.start()
    deadline = time.monotonic() + 20
    while len(receiver.requests) < 3:
        assert time.monotonic() < deadline, f"{len(receiver.requests)} deliveries in flight, wanted 3"
        time.sleep(0.05)
    private_postgres.stop()
    receiver.release.set()  # the receiver accepts; nobody can write that down
    passing.join(30)
    assert failures, "the pass wrote its outcomes without a database"
    private_postgres.start()
    try:
        deliverer = WebhookDeliverer(settings, sessions)
        deliver_until(deliverer, lambda: all(events(sessions, j)[0].status == WebhookStatus.DELIVERED for j in jobs))
        ids = [r["headers"]["X-Farm-Event-Id"] for r in receiver.requests]
        wanted = {str(events(sessions, j)[0].id) for j in jobs}
        assert set(ids) == wanted  # every event reached the receiver, nothing else did
        assert sorted(ids.count(i) for i in wanted) == [1, 2, 2, 2], ids  # the lost answers, sent again
        print(f"{type(failures[0]).__name__} mid-pass; {len(ids)} requests for {len(wanted)} events, all delivered")
    finally:
        engine.dispose()


def test_a_bulk_runs_jobs_report_to_the_owners_default_url_and_name_the_run(hook_db, receivers) -> None:
    """A nightly bulk run tells its owner: each job it writes (one per group of rows) gets the
    owner's default URL at submit and its ``job.started`` (it is created running), then its end,
    each event naming the bulk run; signed with the owner's secret. A base spec's own webhook to a
    private address refuses the whole run, naming the field, and stores nothing."""
    _, sessions = hook_db
    settings = WebhooksSettings(**LOOPBACK_OK)
    receiver = receivers()
    with session_scope(sessions) as session:
        admin, _ = ensure_default_identity(session)
        secret = set_user_webhook_url(session, admin.id, receiver.url)
    assert secret
    rows = read_manifest(
        b'{"id": "r0", "prompt": "p0"}\n{"id": "r1", "prompt": "p1"}\n{"id": "x", "steps": 3}', "night.jsonl"
    )
    with session_scope(sessions) as session:
        made = submit_bulk(session, "nightly-hooks", BASE_SPEC, rows, webhooks=settings)
    assert made["jobs"] == 2
    with session_scope(sessions) as session:
        jobs = list(session.scalars(select(Job.id).join(BulkJob).where(BulkJob.name == "nightly-hooks")))
    assert len(jobs) == 2
    for job_id in jobs:
        (started,) = events(sessions, job_id)
        assert started.type == "job.started" and started.payload["job"]["bulk"] == "nightly-hooks"
    for job_id, end in zip(jobs, (JobStatus.SUCCEEDED, JobStatus.PARTIAL), strict=True):
        with session_scope(sessions) as session:
            set_job_status(session, job_id, end)
    deliverer = WebhookDeliverer(settings, sessions)
    deliver_until(
        deliverer, lambda: all(e.status == WebhookStatus.DELIVERED for j in jobs for e in events(sessions, j))
    )
    got = sorted((json.loads(r["body"])["job"]["id"], r["headers"]["X-Farm-Event"]) for r in receiver.requests)
    first, second = (str(j) for j in jobs)
    wanted = [(first, "job.started"), (first, "job.succeeded"), (second, "job.started"), (second, "job.partial")]
    assert got == sorted(wanted)
    for request in receiver.requests:
        h = request["headers"]
        assert signature_matches(secret, h["X-Farm-Timestamp"], request["body"], h["X-Farm-Signature"])
        assert json.loads(request["body"])["job"]["bulk"] == "nightly-hooks"

    private = {**BASE_SPEC, "webhook": {"url": "http://10.0.0.5/hook"}}
    with pytest.raises(SpecError) as caught, session_scope(sessions) as session:
        submit_bulk(session, "refused-hooks", private, rows, webhooks=settings)
    [(field, reason)] = caught.value.problems
    assert field == "webhook.url" and "public addresses only" in reason, reason
    with session_scope(sessions) as session:
        assert session.scalar(select(BulkJob).where(BulkJob.name == "refused-hooks")) is None
    plain = job_with_webhook(sessions, settings)  # a job of no bulk run says so
    run_job(sessions, plain)
    assert [e.payload["job"]["bulk"] for e in events(sessions, plain)] == [None, None]


def test_a_literal_private_address_is_refused_at_submit(hook_db) -> None:
    _, sessions = hook_db
    new_secret(sessions)
    for url in ("http://10.0.0.5/", "http://[::1]:8080/", "http://169.254.169.254/latest/", "http://[::ffff:a00:5]/"):
        with pytest.raises(SpecError) as caught:
            job_with_webhook(sessions, WebhooksSettings(), webhook_url=url)
        [(field, reason)] = caught.value.problems
        assert field == "webhook_url" and "webhooks go to public addresses only" in reason, reason
    allowed = WebhooksSettings(allow_hosts=["10.0.0.0/8"])
    assert job_with_webhook(sessions, allowed, webhook={"url": "http://10.0.0.5/"})


def test_a_name_resolving_to_loopback_is_refused_when_delivering(hook_db, receivers) -> None:
    _, sessions = hook_db
    settings = WebhooksSettings(backoff_base_s=0.05, backoff_max_s=0.1, max_attempts=2)  # no allow-list
    new_secret(sessions)
    receiver = receivers()
    job_id = job_with_webhook(sessions, settings, webhook_url=f"http://localhost:{receiver.port}/hook")
    run_job(sessions, job_id)
    deliver_until(WebhookDeliverer(settings, sessions), lambda: events(sessions, job_id)[0].status == "dead")
    started = events(sessions, job_id)[0]
    assert started.last_error.startswith("refused: localhost resolves to"), started.last_error
    assert "loopback" in started.last_error and started.last_http_status is None
    assert receiver.requests == []


def test_a_redirect_is_not_followed(hook_db, receivers) -> None:
    _, sessions = hook_db
    settings = WebhooksSettings(**{**LOOPBACK_OK, "max_attempts": 1})
    new_secret(sessions)
    receiver = receivers([302])
    job_id = job_with_webhook(sessions, settings, webhook={"url": receiver.url, "events": ["job.started"]})
    run_job(sessions, job_id)
    WebhookDeliverer(settings, sessions).run_pass()
    [started] = events(sessions, job_id)
    assert (started.status, started.last_http_status) == (WebhookStatus.DEAD, 302)
    assert "redirect to http://127.0.0.1" in started.last_error and "not followed" in started.last_error
    assert [r["path"] for r in receiver.requests] == ["/hook"]


KILLED_DELIVERER = """
import sys
from farm.settings import WebhooksSettings
from farm.webhook_delivery import WebhookDeliverer
from storage.db import make_engine, make_session_factory
settings = WebhooksSettings.model_validate_json(sys.argv[2])
WebhookDeliverer(settings, make_session_factory(make_engine(sys.argv[1]))).run_pass()
"""


def test_a_deliverer_killed_mid_delivery_leaves_the_event_to_be_delivered_later(hook_db, receivers) -> None:
    url, sessions = hook_db
    settings = WebhooksSettings(**{**LOOPBACK_OK, "timeout_s": 60, "claim_lease_s": 120})
    new_secret(sessions)
    receiver = receivers(stall=True)
    job_id = job_with_webhook(sessions, settings, webhook={"url": receiver.url, "events": ["job.cancelled"]})
    with session_scope(sessions) as session:
        set_job_status(session, job_id, JobStatus.CANCELLED)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DELIVERER, url, settings.model_dump_json()],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert receiver.seen.wait(60), "the deliverer never posted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    receiver.release.set()
    [claimed] = events(sessions, job_id)
    assert (claimed.status, claimed.attempts) == (WebhookStatus.PENDING, 1)
    assert claimed.next_attempt_at > utcnow() + timedelta(seconds=60)  # held by the dead deliverer's claim

    deliverer = WebhookDeliverer(settings, sessions)
    assert deliverer.run_pass().delivered == 0  # the claim holds until its lease runs out
    assert deliverer.run_pass(now=claimed.next_attempt_at + timedelta(seconds=1)).delivered == 1
    [event] = events(sessions, job_id)
    assert (event.status, event.attempts) == (WebhookStatus.DELIVERED, 2)
    assert [r["headers"]["X-Farm-Event-Id"] for r in receiver.requests] == [str(event.id)] * 2  # at least once


def test_progress_events_are_throttled(hook_db) -> None:
    from storage.transitions import refresh_job_counts
    from storage.webhook_outbox import record_progress_event

    _, sessions = hook_db
    settings = WebhooksSettings(progress_interval_s=3600)
    new_secret(sessions)
    job_id = job_with_webhook(sessions, settings, webhook_url="https://hooks.example.com/farm")
    with session_scope(sessions) as session:
        set_job_status(session, job_id, JobStatus.RUNNING, started_at=utcnow())
        assert record_progress_event(session, job_id, 1) is not None
        assert record_progress_event(session, job_id, 2) is None  # within the interval
        refresh_job_counts(session, job_id)  # a roll-up: no shards, nothing new done
    assert [e.type for e in events(sessions, job_id)] == ["job.started", "job.progress"]


def test_event_names_agree_with_the_spec() -> None:
    from farm.job_spec import WebhookEventName

    assert set(WebhookEventName.__args__) == set(EVENT_TYPES)


def test_a_submit_needs_the_owners_signing_secret(hook_db) -> None:
    _, sessions = hook_db
    with pytest.raises(SpecError, match="no webhook signing secret yet"):
        job_with_webhook(sessions, WebhooksSettings(), webhook_url="https://hooks.example.com/farm")
    assert job_with_webhook(sessions, WebhooksSettings(enabled=False), webhook_url="https://hooks.example.com/farm")


# -- the CLI and the API ------------------------------------------------------------------------


def cli(cwd: Path, *args: str, **farm_env: str) -> subprocess.CompletedProcess[str]:
    """``farm ARGS`` in ``cwd`` with none of this process's FARM_ settings, only ``farm_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return farm_cli({**env, "PYTHONPATH": str(ROOT), **farm_env}, *args, cwd=cwd)


def test_users_set_webhook_and_secret_through_a_pipe(tmp_path: Path) -> None:
    assert cli(tmp_path, "db", "upgrade").returncode == 0
    assert cli(tmp_path, "users", "add", "ann", "--role", "member").returncode == 0
    refused = cli(tmp_path, "users", "set-webhook", "ann", "http://10.0.0.5/hook")
    assert refused.returncode == 2 and "url: 10.0.0.5 is a private address" in refused.stderr, refused.stderr
    first = cli(tmp_path, "users", "set-webhook", "ann", "https://hooks.example.com/farm")
    assert first.returncode == 0, first.stderr
    secret = first.stdout.strip()
    assert secret.startswith("whsec_") and "cannot be shown again" in first.stderr
    again = cli(tmp_path, "users", "set-webhook", "ann", "https://hooks.example.com/other")
    assert again.returncode == 0 and again.stdout == ""  # the secret is not shown twice
    rotated = cli(tmp_path, "users", "webhook-secret", "ann")
    assert rotated.returncode == 0 and rotated.stdout.strip().startswith("whsec_")
    assert rotated.stdout.strip() != secret
    audit = cli(tmp_path, "audit", "--action", "webhook.*")
    assert audit.stdout.count("webhook.") >= 3 and secret not in audit.stdout


@pytest.mark.integration
def test_the_api_sets_urls_and_secrets_and_shows_deliveries_in_scope(farm_factory, api_server_factory) -> None:
    from tests.fixtures.api import add_person

    farm = farm_factory()
    server = api_server_factory(farm)
    alice = add_person(farm, server, "alice", "member", project="red")
    bob = add_person(farm, server, "bob", "member", project="blue")
    spec = {**BASE_SPEC, "model": "org/model", "webhook_url": "https://hooks.example.com/farm"}
    with alice.http() as http:
        early = http.post("/v1/jobs", json={"spec": spec})
        assert early.status_code == 422 and "no webhook signing secret yet" in early.text
        private = http.put("/v1/me/webhook", json={"url": "http://169.254.169.254/"})
        assert private.status_code == 422
        assert private.json()["error"]["problems"][0]["field"] == "url"
        made = http.put("/v1/me/webhook", json={"url": "https://hooks.example.com/default"}).json()
        assert made["url"] == "https://hooks.example.com/default" and made["secret"].startswith("whsec_")
        assert "secret" not in http.put("/v1/me/webhook", json={"url": "https://hooks.example.com/default"}).json()
        assert http.get("/v1/me/webhook").json() == {"url": "https://hooks.example.com/default", "has_secret": True}
        rotated = http.post("/v1/me/webhook-secret").json()["secret"]
        assert rotated.startswith("whsec_") and rotated != made["secret"]
        literal = http.post("/v1/jobs", json={"spec": {**spec, "webhook_url": "http://10.0.0.5/"}})
        assert literal.status_code == 422
        assert literal.json()["error"]["problems"][0]["field"] == "webhook_url"
        job = http.post("/v1/jobs", json={"spec": spec}).json()["job_id"]
        assert http.post(f"/v1/jobs/{job}/cancel").status_code == 200
        [cancelled] = http.get(f"/v1/jobs/{job}/webhooks").json()
        assert (cancelled["event"], cancelled["status"], cancelled["attempts"]) == ("job.cancelled", "pending", 0)
        assert alice.client().webhook_deliveries(job) == [cancelled]  # the client through the API
    with bob.http() as http:
        assert http.get(f"/v1/jobs/{job}/webhooks").status_code == 404  # another project's job


# -- real workers -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_run_by_real_workers_reports_started_then_succeeded(
    farm_factory, pg_database_factory, receivers, tiny_models, bench_kind
) -> None:
    receiver = receivers()
    farm = farm_factory(
        db_url=pg_database_factory(),
        FARM_WEBHOOKS__ALLOW_HOSTS='["127.0.0.1"]',
        FARM_WEBHOOKS__POLL_INTERVAL_S="0.2",
        FARM_WEBHOOKS__PROGRESS_INTERVAL_S="0.2",
        FARM_WORKER__ROLLUP_INTERVAL_S="0.2",
    )
    settings: FarmSettings = farm.settings()
    engine = make_engine(settings.database_url)
    secret = new_secret(make_session_factory(engine))
    engine.dispose()
    farm.start_workers(["farm.control", "farm.gpu.sd15"], ["w0"], module="bench.farm_worker")
    spec = {
        "kind": "bench_noop",
        "model": str(tiny_models["sd15"]),
        "family": "sd15",
        "prompts": ["a no-op render"],
        "base_seed": 1,
        "count": 4,
        "shard_size": 1,
        "item_seconds": 0.2,
        "output_prefix": "hooks",
        "webhook_url": receiver.url,
    }
    with farm.client() as client:
        job_id = client.submit(spec)
        assert client.wait(job_id, timeout=180)["status"] == "succeeded"
        deadline = time.monotonic() + 60
        deliveries = client.webhook_deliveries(job_id)
        while not (deliveries[-1]["event"] == "job.succeeded" and deliveries[-1]["status"] == "delivered"):
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.1)
            deliveries = client.webhook_deliveries(job_id)
    kinds = [r["headers"]["X-Farm-Event"] for r in receiver.requests]
    print("events received:", kinds)
    assert kinds[0] == "job.started" and kinds[-1] == "job.succeeded", kinds
    assert set(kinds[1:-1]) <= {"job.progress"}, kinds
    done = [json.loads(r["body"])["job"]["items"]["done"] for r in receiver.requests]
    assert done == sorted(done) and done[-1] == 4, done
    for request in receiver.requests:
        h = request["headers"]
        assert signature_matches(secret, h["X-Farm-Timestamp"], request["body"], h["X-Farm-Signature"])
    assert [d["event"] for d in deliveries] == kinds
    assert {d["status"] for d in deliveries} == {"delivered"}
