"""``farm config``: every setting, its environment variable, its default and its current value."""

from __future__ import annotations

import typer
from rich.table import Table

from farm.cli.common import console, settings
from farm.settings import SettingRow, setting_rows

app = typer.Typer(help="Show the farm's settings and the FARM_* variables that set them.", no_args_is_help=True)


@app.command()
def show(
    markdown: bool = typer.Option(False, "--markdown", help="Print the table of all settings as Markdown."),
) -> None:
    """List every setting with its env var, default and current value (secrets hidden)."""
    cfg = settings()
    rows = setting_rows(cfg)
    if markdown:
        typer.echo(markdown_table(rows))
        return
    table = Table(title=f"farm settings ({'embedded' if cfg.embedded else 'server'} mode)")
    for column in ("env var", "current", "default", "what"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.env_var, row.current, row.default, row.description)
    console.print(table)


def markdown_table(rows: list[SettingRow]) -> str:
    """The settings as the Markdown table in the README (current values left out)."""
    lines = ["| env var | default | what it sets |", "| --- | --- | --- |"]
    for row in rows:
        description = row.description.replace("|", "\\|")
        default = f"`{row.default}`" if row.default else "(see text)"
        lines.append(f"| `{row.env_var}` | {default} | {description} |")
    return "\n".join(lines)
