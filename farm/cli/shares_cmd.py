"""``farm projects`` and ``farm users set-quota``: fair-share weights and caps, set in the
database on the control host (direct mode, like ``farm users``), each change audited.

The feeder reads them at every pick (:mod:`farm.feeder`): a new weight or cap counts from the
next shard sent.
"""

from __future__ import annotations

import json

import typer

from farm.cli.common import console, settings
from farm.cli.jobs_cmd import print_rows
from farm.cli.users_cmd import _audit, _session, users_app
from farm.errors import UserError
from storage.share_usage import project_shares, set_project_share, set_user_quota

projects_app = typer.Typer(help="Projects: fair-share weights, caps, what they use.", no_args_is_help=True)


@projects_app.command("list")
def projects_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List projects: fair-share weight, cap of shards in flight, GPU seconds used recently
    (halved every scheduling.half_life_s), shards in flight now, members."""
    conf = settings().scheduling
    with _session() as session:
        rows = project_shares(session, conf.half_life_s)
    for row in rows:  # what the feeder uses: the project's own value, else the settings'
        row["weight"] = conf.project_weight(row["name"], row["weight"])
        if row["max_running_shards"] is None:
            row["max_running_shards"] = conf.max_running_per_project or None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    shown = [
        (
            r["name"],
            f"{r['weight']:g}",
            str(r["max_running_shards"] or "-"),
            f"{r['gpu_seconds']:.0f}",
            str(r["in_flight"]),
            str(r["members"]),
        )
        for r in rows
    ]
    print_rows("projects", ("name", "weight", "cap", "gpu_s", "in_flight", "members"), shown)


@projects_app.command("set-share")
def set_share(
    name: str = typer.Argument(..., help="Project name."),
    weight: float | None = typer.Option(None, "--weight", help="Fair-share weight (> 0; 3 gets 3x a project of 1)."),
    max_running: int | None = typer.Option(
        None, "--max-running", help="Most shards queued or running at once for the project (0: no cap)."
    ),
    default_cap: bool = typer.Option(False, "--default-cap", help="Use scheduling.max_running_per_project again."),
) -> None:
    """Set a project's fair-share weight and/or its cap of shards in flight."""
    if weight is None and max_running is None and not default_cap:
        raise UserError("give --weight, --max-running or --default-cap")
    with _session() as session:
        set_project_share(session, name, weight=weight, max_running=max_running, clear_cap=default_cap)
        _audit(session, "project.share", name, weight=weight, max_running=max_running, default_cap=default_cap)
    said = [f"weight {weight:g}"] if weight is not None else []
    said += [f"cap {max_running or 'none'}"] if max_running is not None else []
    said += ["cap from the settings"] if default_cap else []
    console.print(f"project {name}: {', '.join(said)}", highlight=False)


@users_app.command("set-quota")
def set_quota(
    name: str = typer.Argument(..., help="User name."),
    max_running: int | None = typer.Option(
        None, "--max-running", help="Most of the user's shards queued or running at once (0: no cap)."
    ),
    max_items_per_day: int | None = typer.Option(
        None, "--max-items-per-day", help="Most items the user may submit in 24 hours (0: no cap)."
    ),
) -> None:
    """Set a user's caps (over scheduling.max_running_per_user and scheduling.max_items_per_day)."""
    if max_running is None and max_items_per_day is None:
        raise UserError("give --max-running and/or --max-items-per-day")
    with _session() as session:
        set_user_quota(session, name, max_running=max_running, max_items_per_day=max_items_per_day)
        _audit(session, "user.quota", name, max_running=max_running, max_items_per_day=max_items_per_day)
    said = [f"at most {max_running or 'any number of'} shards in flight"] if max_running is not None else []
    said += [f"at most {max_items_per_day or 'any number of'} items a day"] if max_items_per_day is not None else []
    console.print(f"user {name}: {', '.join(said)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(projects_app, name="projects")
