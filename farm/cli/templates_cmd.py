"""``farm templates save|list|show|delete``: saved job specs (``farm submit --template NAME``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from farm.cli.common import console, settings
from farm.client import FarmClient

app = typer.Typer(
    help="Saved job specs: a full valid spec under a name, submitted with `farm submit --template NAME --set ...`.",
    no_args_is_help=True,
)
PROJECT_HELP = "The project (default: your only one; `default` on the control host)."


def _client():

    return FarmClient(settings())


@app.command()
def save(
    name: str = typer.Argument(..., help="The template's name (letters, digits, . _ -; unique in its project)."),
    spec_file: Path = typer.Argument(..., help="A full, valid job spec (YAML or JSON), without idempotency_key."),
    project: str | None = typer.Option(None, "--project", help=PROJECT_HELP),
) -> None:
    """Check a spec as a submit checks it and save it as a template (replacing one of that name)."""
    with _client() as client:
        saved = client.save_template(name, spec_file, project=project)
    verb = "saved" if saved["created"] else "replaced"
    console.print(f"{verb} template {saved['name']} ({saved['kind']}) in project {saved['project']}", highlight=False)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of lines.")) -> None:
    """The templates you may use: project, name, kind, owner, last change."""
    with _client() as client:
        found = client.templates()
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    typer.echo("\t".join(("project", "name", "kind", "owner", "updated")))  # plain lines: never folded
    for t in found:
        typer.echo("\t".join((t["project"], t["name"], t["kind"], t["owner"], t["updated_at"][:19])))


@app.command()
def show(
    name: str = typer.Argument(...),
    project: str | None = typer.Option(None, "--project", help=PROJECT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """A template's spec (YAML, as a spec file is written)."""
    with _client() as client:
        found = client.template(name, project=project)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    typer.echo(f"# template {found['name']} in project {found['project']}, by {found['owner']}")
    typer.echo(yaml.safe_dump(found["spec"], sort_keys=False, allow_unicode=True, width=100), nl=False)


@app.command()
def delete(
    name: str = typer.Argument(...),
    project: str | None = typer.Option(None, "--project", help=PROJECT_HELP),
) -> None:
    """Delete a template (jobs submitted from it are not touched)."""
    with _client() as client:
        client.delete_template(name, project=project)
    console.print(f"deleted template {name}", highlight=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="templates")
