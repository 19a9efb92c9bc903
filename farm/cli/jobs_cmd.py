"""Job commands: submit, status, wait, cancel, retry, results."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from farm.cli.common import console, settings


def _client():
    from farm.client import FarmClient

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


def print_job(summary: dict, previews: dict | None = None) -> None:
    pace = f"  {summary['seconds_per_item']:.2f} s/item" if summary.get("seconds_per_item") else ""
    eta = f"  ETA {duration(summary['eta_s'])}" if summary.get("eta_s") is not None else ""
    console.print(
        f"job {summary['id']}  [bold]{summary['status']}[/]  {summary['kind']}/{summary['family']}  "
        f"items {summary['items_done']}/{summary['items_total']}  shards {summary['shards_done']}/"
        f"{summary['shards_total']} done, {summary['shards_failed']} failed{pace}{eta}"
    )
    if summary.get("error"):
        console.print(f"error: {summary['error']}", highlight=False)
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
    if listed > TABLE_ROWS:  # a table of thousands of rows takes rich minutes: plain lines instead
        typer.echo("\t".join(SHARD_COLUMNS))
        typer.echo("\n".join("\t".join(" ".join(c.split()) for c in _shard_cells(s)) for s in summary["shards"]))
    elif listed:
        table = Table()
        for column in SHARD_COLUMNS:
            table.add_column(column, overflow="fold")
        for s in summary["shards"]:
            table.add_row(*_shard_cells(s))
        console.print(table)
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


def submit(
    spec_file: Path = typer.Argument(..., help="Job spec, YAML or JSON."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job and show progress."),
) -> None:
    """Validate and submit a job spec; prints the job id."""
    with _client() as client:
        job_id = client.submit(spec_file)
        console.print(f"submitted job {job_id}")
        if wait:
            print_job(wait_with_progress(client, job_id))


SHARDS_HELP = "Shards to list: a number (failed, running, most recently changed first; default 20) or 'all'."


def _get(client, job_id: str, shards: str | None) -> dict:
    """The job's summary, listing the client's default number of shards unless ``shards`` says."""
    return client.get(job_id) if shards is None else client.get(job_id, shards=shards)


def status(
    job_id: str | None = typer.Argument(None, help="A job id; without it, the latest jobs."),
    shards: str | None = typer.Option(None, "--shards", help=SHARDS_HELP),
) -> None:
    """Show one job with its counts by shard status and the shards worth a look, or a table of
    recent jobs."""
    with _client() as client:
        if job_id:
            print_job(_get(client, job_id, shards), client.previews(job_id))
            return
        table = Table(title="jobs")
        for column in ("id", "status", "kind", "family", "items", "failed shards", "s/item", "ETA", "created"):
            table.add_column(column)
        for j in client.list_jobs():
            table.add_row(
                j["id"],
                j["status"],
                j["kind"],
                j["family"],
                f"{j['items_done']}/{j['items_total']}",
                str(j["shards_failed"]),
                f"{j['seconds_per_item']:.2f}" if j["seconds_per_item"] else "",
                duration(j["eta_s"]),
                j["created_at"][:19],
            )
        console.print(table)


def wait(
    job_id: str = typer.Argument(...),
    timeout: float | None = typer.Option(None, help="Give up after this many seconds."),
) -> None:
    """Wait for a job to finish, with a progress bar."""
    with _client() as client:
        summary = wait_with_progress(client, job_id, timeout)
    print_job(summary)
    if summary["status"] != "succeeded":
        raise typer.Exit(1)


def cancel(
    job_id: str = typer.Argument(...),
    shards: str | None = typer.Option(None, "--shards", help=SHARDS_HELP),
) -> None:
    """Cancel a job: pending shards now, running shards at their next step."""
    with _client() as client:
        summary = client.cancel(job_id)
        print_job(summary if shards is None else client.get(job_id, shards=shards))


def retry(job_id: str = typer.Argument(..., help="A job id, or a bulk job's name.")) -> None:
    """Re-queue a job's failed shards, or re-feed a bulk job's failed rows."""
    import uuid

    with _client() as client:
        try:
            uuid.UUID(job_id)
        except ValueError:
            console.print(f"re-fed {client.retry_bulk(job_id)} failed shard(s) of bulk job {job_id}")
            return
        failed = client.retry_failed(job_id)
        console.print(f"re-queued {failed} failed shard(s) of job {job_id}")
        resent = client.resend_stuck(job_id)
        if resent:
            console.print(f"re-sent {resent} stuck shard(s) of job {job_id} (their messages were lost)")


def results(
    job_id: str = typer.Argument(...),
    download: Path | None = typer.Option(None, "--download", help="Save the outputs into this folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List a job's outputs with URLs (presigned on S3), or download them."""
    with _client() as client:
        artifacts = client.results(job_id, download)
        previews = client.previews(job_id)
    if as_json:
        typer.echo(json.dumps(artifacts, indent=2))
        return
    for a in artifacts:
        console.print(f"{a['item_index']:>6}  seed {a['seed']:<12} {a.get('path') or a['url']}", highlight=False)
    for name in ("contact_sheet", "manifest"):
        if previews[name]:
            console.print(f"{name.replace('_', ' ')}: {previews[name]}", highlight=False)


def register(app: typer.Typer) -> None:
    for command in (submit, status, wait, cancel, retry, results):
        app.command()(command)
