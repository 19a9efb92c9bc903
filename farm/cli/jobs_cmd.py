"""Job commands: submit (a file, or a template with overrides), status, wait, cancel, retry, rerun, results."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from farm.cli.common import console, settings
from farm.client import FarmClient
from farm.errors import NotFound, UserError
from farm.job_refs import short_id
from farm.spec_overrides import parse_sets
from storage.status import ServiceClass


def _client():

    return FarmClient(settings())


def wait_with_progress(client, job_id, timeout: float | None = None) -> dict:
    """Wait for a job with a progress bar of items done / total and an ETA."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} items"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"job {str(job_id)[:8]}", total=None, state="")

        def update(summary: dict) -> None:
            failed = summary["shards_failed"]
            state = summary["status"] + (f", {failed} shard(s) failed" if failed else "")
            if summary.get("waiting"):
                state += f" ({summary['waiting'][0]})"
            progress.update(task, total=summary["items_total"] or None, completed=summary["items_done"], state=state)

        return client.wait(job_id, timeout=timeout, on_progress=update)


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; empty when unknown."""
    if seconds is None:
        return ""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


SHARD_COLUMNS = ("shard", "queue", "status", "items", "progress", "attempt", "worker", "error")
TABLE_ROWS = 500  # more shards than this are printed as tab-separated lines
TABLE_WIDTH = 100  # narrower terminals and pipes get plain lines: nothing folded mid-word


def plain_output() -> bool:
    """Plain lines instead of tables: piped, or a terminal too narrow for a table to keep ids,
    paths and errors whole."""
    return not console.is_terminal or console.width < TABLE_WIDTH


def print_rows(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A table in a wide terminal; tab-separated lines through a pipe or in a narrow one."""
    if plain_output():
        typer.echo("\t".join(columns))
        for row in rows:
            typer.echo("\t".join(row))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _linked(link: dict) -> str:
    """A job in ``after``/``then``: its short id, name and kind, or that the viewer may not open it."""
    if link.get("hidden") or not link.get("id"):
        return "a job you may not open"
    named = f" ({link['name']})" if link.get("name") else ""
    kind = f" {link['kind']}" if link.get("kind") else ""
    return f"job {link['id'][:8]}{named}{kind}"


def _items(summary: dict) -> str:
    if summary["status"] == "pending" or not summary.get("items_total"):
        return "items: not split into shards yet"
    return f"items {summary['items_done']}/{summary['items_total']}"


def print_job(summary: dict, previews: dict | None = None) -> None:
    pace = f"  {summary['seconds_per_item']:.2f} s/item" if summary.get("seconds_per_item") else ""
    eta = f"  ETA {duration(summary['eta_s'])}" if summary.get("eta_s") is not None else ""
    shards = (
        f"  shards {summary['shards_done']}/{summary['shards_total']} done, {summary['shards_failed']} failed"
        if summary["shards_total"]
        else ""
    )
    console.print(
        f"job {summary['id']}  [bold]{summary['status']}[/]  {summary['kind']}/{summary['family']}  "
        f"{_items(summary)}{shards}{pace}{eta}"
    )
    if summary.get("parent_job_id"):
        console.print(f"re-run of job {summary['parent_job_id']}", highlight=False)
    if summary.get("error"):
        console.print(f"error: {summary['error']}", highlight=False)
    for up in summary.get("after") or []:
        console.print(
            f"after: {_linked(up)} {up['status']} (mode {up['mode']}, policy {up['policy']})", highlight=False
        )
    for down in summary.get("then") or []:
        console.print(f"then: {_linked(down)} {down['status']}", highlight=False)
    for reason in summary.get("waiting") or []:
        console.print(f"waiting: {reason}", highlight=False)
    by_status = summary.get("shards_by_status") or {}
    listed, total = len(summary["shards"]), summary["shards_total"]
    if listed < total:
        counts = ", ".join(f"{n:,} {status}" for status, n in sorted(by_status.items(), key=lambda kv: -kv[1]))
        console.print(f"shards: {counts}", highlight=False)
        console.print(
            f"listing {listed} of {total:,} shards (failed, running, most recently changed); "
            "--shards all lists every one",
            highlight=False,
        )
    rows = [_shard_cells(s) for s in summary["shards"]]
    if listed > TABLE_ROWS or (listed and plain_output()):
        typer.echo("\t".join(SHARD_COLUMNS))
        typer.echo("\n".join("\t".join(" ".join(cell.split()) for cell in row) for row in rows))
    elif listed:
        table = Table()
        for column in SHARD_COLUMNS:
            table.add_column(column, no_wrap=column != "error")
        for row in rows:  # errors in full under the table: never folded mid-word in a cell
            table.add_row(*row[:-1], "see below" if row[-1] else "")
        console.print(table)
        for s, row in zip(summary["shards"], rows, strict=True):
            if row[-1]:
                console.print(f"shard {s['index']}: {row[-1]}", highlight=False)
    _print_blocked(summary)
    _print_previews(previews)


def _shard_cells(s: dict) -> tuple[str, ...]:
    errors = s["error"] or ""
    if len(s.get("failed_workers") or []) > 1:
        errors += f" (failed on {', '.join(s['failed_workers'])})"
    return (
        str(s["index"]),
        s["queue"],
        s["status"],
        f"{s['items_done']}/{s['items_total']}",
        f"{s['progress']:.0%}",
        str(s["attempts"]),
        s["worker"] or "",
        errors,
    )


def _print_blocked(summary: dict) -> None:
    for b in summary.get("blocked_workers") or []:
        console.print(
            f"blocked: worker {b['worker']} no longer takes this job's shards after {b['failures_in_a_row']} "
            f"failures in a row (since {b['blocked_at'][:19]}); last error: {b['last_error']}",
            highlight=False,
        )


def _print_previews(previews: dict | None) -> None:
    for name, url in (previews or {}).items():
        for link in url if isinstance(url, list) else [url] if url else []:
            console.print(f"{name.replace('_', ' ')}: {link}", highlight=False)


EXIT_CODES = (
    "Exit codes: 0 the job succeeded; 1 it failed, ended partial or was cancelled (or a service "
    "failed); 2 a usage or validation error (a bad spec, an unknown job id)."
)


def _exit_for(summary: dict) -> None:
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


SET_HELP = (
    "Change the spec: KEY=VALUE, KEY a dotted path (prompts.0), VALUE read as JSON when it parses "
    "(30, '[1,2,3]', null), else text. Repeat it."
)


def submit(
    spec_file: Path | None = typer.Argument(None, help="Job spec, YAML or JSON (not with --template)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job and show progress; exit 1 unless it succeeds."),
    template: str | None = typer.Option(None, "--template", help="Submit from this saved template (farm templates)."),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP + " With --template."),
    project: str | None = typer.Option(
        None, "--project", help="The template's project, when several of yours have one of that name."
    ),
) -> None:
    """Validate and submit a job spec, or a saved template with --set overrides; prints the job id.

    Exit codes: 0 submitted (with --wait: the job succeeded); 1 with --wait the job failed, ended
    partial or was cancelled, or the broker was down (the job is kept and scheduled later); 2 a
    usage or validation error."""
    if (spec_file is None) == (template is None):
        raise UserError("give a spec FILE or --template NAME (one of them)")
    if sets and template is None:
        raise UserError("--set changes a template (--template NAME); edit the spec file instead")
    with _client() as client:
        if template is not None:
            done = client.submit_template(template, parse_sets(sets), project=project)
        else:
            done = client.submit_job(spec_file)
        if done.created:
            console.print(f"submitted job {done.job_id}", highlight=False)
        else:
            console.print(
                f"already submitted as job {done.job_id} ({done.status}): its idempotency_key was used before "
                "with this spec; nothing new was submitted",
                highlight=False,
            )
        if wait:
            summary = wait_with_progress(client, done.job_id)
            print_job(summary)
            _exit_for(summary)


SHARDS_HELP = "Shards to list: a number (failed, running, most recently changed first; default 20) or 'all'."
JOB_HELP = "A job id, or its first characters (at least 4; `farm status` prints 8)."


def _get(client, job_id: str, shards: str | None) -> dict:
    """The job's summary, listing the client's default number of shards unless ``shards`` says."""
    return client.get(job_id) if shards is None else client.get(job_id, shards=shards)


def status(
    job_id: str | None = typer.Argument(None, help=JOB_HELP + " Without it, the latest jobs."),
    shards: str | None = typer.Option(None, "--shards", help=SHARDS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    limit: int = typer.Option(20, "--limit", min=1, max=1000, help="How many recent jobs to list."),
    queues: bool = typer.Option(
        False,
        "--queues",
        help="Each work queue's demand (GPU queues, farm.cpu) instead: shards, items left, speeds, workers.",
    ),
) -> None:
    """Show one job with its counts by shard status, the shards worth a look and why it waits, or
    the latest jobs (or, with --queues, each work queue's demand)."""
    if queues:
        if job_id:
            raise UserError("--queues shows every queue: give no job id with it")
        with _client() as client:
            print_queues(client.queues(), as_json)
        return
    with _client() as client:
        if job_id:
            summary = _get(client, job_id, shards)
            previews = client.previews(summary["id"])
            hooks = client.webhook_deliveries(summary["id"])
            if as_json:
                typer.echo(json.dumps({**summary, "previews": previews, "webhooks": hooks}, indent=2))
            else:
                print_job(summary, previews)
                print_deliveries(hooks)
            return
        jobs = client.list_jobs(limit=limit)
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    columns = ("id", "status", "kind", "family", "items", "failed shards", "s/item", "ETA", "created")
    rows = [
        (
            short_id(j["id"]),
            j["status"],
            j["kind"],
            j["family"],
            f"{j['items_done']}/{j['items_total']}" if j["items_total"] else "-",
            str(j["shards_failed"]),
            f"{j['seconds_per_item']:.2f}" if j["seconds_per_item"] else "",
            duration(j["eta_s"]),
            j["created_at"][:19],
        )
        for j in jobs
    ]
    print_rows("jobs", columns, rows)


QUEUE_COLUMNS = ("queue", "pending", "queued", "running", "items left", "oldest", "s/item", "load", "live", "desired")


def print_queues(rows: list[dict], as_json: bool = False) -> None:
    """``farm status --queues``: one row per work queue (``*`` after a speed: the settings' default,
    nothing measured yet)."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    lines = []
    for q in rows:
        guess = "" if q["observed"] else "*"
        cap = f"/{q['max_workers']}" if q["max_workers"] is not None else ""
        lines.append(
            (
                q["queue"],
                str(q["pending"]),
                str(q["queued"]),
                str(q["running"]),
                str(q["items_left"]),
                duration(q["oldest_waiting_s"]) if q["pending"] + q["queued"] else "-",
                f"{q['seconds_per_item']:.2f}{guess}",
                f"{duration(q['model_load_s'])}{guess}",
                str(q["live_workers"]),
                f"{q['desired_workers']}{cap}",
            )
        )
    print_rows("queues (* not measured yet: the autoscale defaults)", QUEUE_COLUMNS, lines)


def wait(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    timeout: float | None = typer.Option(None, help="Give up after this many seconds."),
) -> None:
    """Wait for a job to finish, with a progress bar.

    Exit codes: 0 the job succeeded; 1 it failed, ended partial, was cancelled, or the wait timed
    out; 2 a usage error (an unknown job id)."""
    with _client() as client:
        summary = wait_with_progress(client, client.job_id(job_id), timeout)
    print_job(summary)
    _exit_for(summary)


def cancel(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    shards: str | None = typer.Option(None, "--shards", help=SHARDS_HELP),
) -> None:
    """Cancel a job: pending shards now, running shards at their next step. A job that has
    already ended, or whose shards have all ended, is left as it is (exit 0)."""
    with _client() as client:
        summary = client.cancel(job_id)
        outcome = summary["cancel"]
        words = {
            "cancelled": "cancelled",
            "finishing": "not cancelled: every shard had already ended; the job keeps the status they give it",
        }
        console.print(f"job {summary['id']}: {words.get(outcome, outcome)}", highlight=False)
        print_job(summary if shards is None else client.get(summary["id"], shards=shards))


def reprioritize(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    priority: int | None = typer.Option(None, "--priority", min=0, max=9, help="Job priority, 0-9 (within its class)."),
    service_class: ServiceClass | None = typer.Option(
        None, "--class", help="interactive (first on every queue) or bulk (admins only through the API)."
    ),
) -> None:
    """Change a job's priority and/or its service class; its next shards are fed accordingly."""
    if priority is None and service_class is None:
        raise UserError("give --priority and/or --class")
    with _client() as client:
        if priority is not None:
            summary = client.set_priority(job_id, priority)
        if service_class is not None:
            summary = client.set_class(job_id, service_class.value)
    console.print(f"job {summary['id']}: {summary['service_class']}, priority {summary['priority']}", highlight=False)


def retry(job_id: str = typer.Argument(..., help=JOB_HELP + " Or a bulk job's name.")) -> None:
    """Re-queue a job's failed shards and send its stuck ones again, or re-feed a bulk job's
    failed rows. A cancelled job is not retried; nothing to retry is not an error (exit 0)."""

    with _client() as client:
        try:
            client.job_id(job_id)
        except (NotFound, UserError) as not_a_job:
            try:
                count = client.retry_bulk(job_id)
            except NotFound:
                raise NotFound(f"{not_a_job}; no bulk job is named {job_id!r} either") from None
            console.print(f"re-fed {count} failed shard(s) of bulk job {job_id}", highlight=False)
            return
        console.print(client.retry(job_id)["note"], highlight=False)


def rerun(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    only_failed: bool = typer.Option(
        False, "--only-failed", help="Only the items the job did not render (same indexes and seeds)."
    ),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    wait: bool = typer.Option(False, "--wait", help="Wait for the new job; exit 1 unless it succeeds."),
) -> None:
    """Submit a new job from a job's spec: with --set changes, or only its failed items. The
    job itself is untouched: the re-run writes under its own id and names it as its parent.

    Exit codes: 0 submitted (with --wait: the new job succeeded); 1 with --wait it did not; 2 a
    usage or validation error (a bad --set, a job still running, nothing failed)."""
    overrides = parse_sets(sets)
    with _client() as client:
        done = client.rerun(job_id, only_failed=only_failed, overrides=overrides)
        what = "its failed items" if done["only_failed"] else "all its items"
        verb = "submitted" if done["created"] else "already submitted (its idempotency_key was used before) as"
        console.print(
            f"{verb} job {done['job_id']}: a re-run of job {done['parent_job_id']} ({what}: {done['items_total']})",
            highlight=False,
        )
        if wait:
            summary = wait_with_progress(client, done["job_id"])
            print_job(summary)
            _exit_for(summary)


def results(
    job_id: str = typer.Argument(..., help=JOB_HELP),
    download: Path | None = typer.Option(
        None, "--download", help="Save the outputs (and the contact sheet and manifest) into this folder."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List a job's outputs (kind, prompt, seed, frame, type) with URLs (presigned on S3), or
    download them."""
    with _client() as client:
        job = client.job_id(job_id)
        artifacts = client.results(job, download)
        previews = client.previews(job, download=download)
    if as_json:
        typer.echo(json.dumps({"artifacts": artifacts, "previews": previews}, indent=2))
        return
    columns = ("item", "kind", "prompt", "seed", "frame", "type", "where")
    rows = [
        (
            str(a["item_index"]),
            a.get("kind") or "",
            _shorten(a.get("prompt") or "", 32),
            str(a["seed"]),
            "" if a.get("frame") is None else str(a["frame"]),
            (a["content_type"] or "").split("/")[-1],
            a.get("path") or a["url"],
        )
        for a in artifacts
    ]
    typer.echo("\t".join(columns))  # plain lines: URLs and paths are never folded
    typer.echo("\n".join("\t".join(row) for row in rows))
    for name in ("contact_sheet", "manifest"):
        if previews.get(name):
            typer.echo(f"{name.replace('_', ' ')}: {previews.get(name + '_path') or previews[name]}")


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def print_deliveries(events: list[dict]) -> None:
    """The job's webhook events: one line each (event, status, attempts, last HTTP status, error)."""
    if not events:
        return
    typer.echo("webhooks:")
    for e in events:
        http = f"  HTTP {e['last_http_status']}" if e.get("last_http_status") else ""
        error = f"  {e['last_error']}" if e.get("last_error") and e["status"] != "delivered" else ""
        tries = f"{e['attempts']} attempt{'s' if e['attempts'] != 1 else ''}"
        typer.echo(f"  {e['event']}  {e['status']}  {tries}{http}{error}")


def register(app: typer.Typer) -> None:
    for command in (submit, status, wait, cancel, retry, rerun, results):
        app.command()(command)
    app.command("reprioritize")(reprioritize)
