"""What every CLI command shares: loading settings, keeping library noise off the terminal, and
turning farm errors into clean exits."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer
from rich.console import Console

from farm.errors import FarmError
from farm.settings import FarmSettings, load_settings

console = Console(soft_wrap=True)  # ids, URLs, paths and errors are never folded mid-word
err_console = Console(stderr=True, soft_wrap=True)

# Set by ``farm --verbose`` and read by every farm process started from it (a demo's worker).
VERBOSE_ENV = "PATCHFARM_VERBOSE"
# Libraries that talk on the terminal by themselves: only their errors get through.
QUIET_LOGGERS = ("transformers", "diffusers", "huggingface_hub", "accelerate", "kombu.connection", "py.warnings")
# Read by those libraries when they are imported (and by the processes a command starts).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # e.g. "`CLIPImageProcessor` requires torchvision ...; falling back"
    "DIFFUSERS_VERBOSITY": "error",  # e.g. "Couldn't connect to the Hub ... Will try to load from local cache"
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
QUIET_WARNINGS = (
    r"You're running the worker with superuser privileges",  # Celery, for a worker run as root
    r".*torchvision",
)


_QUIETED_ENV: dict[str, str] = {}  # what setup_logging set in os.environ (given back for --verbose)


def verbose_requested() -> bool:
    """Whether this process, or the farm command that started it, was run with ``--verbose``."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def setup_logging(verbose: bool = False) -> None:
    """Keep library noise (torchvision fallbacks, kombu's "No hostname was supplied", Celery's
    warning about running as root, hub progress bars) off the terminal; ``verbose`` lets it all
    through, in this process and in the farm processes it starts (a demo's worker). The farm's
    own log messages are never hidden. Idempotent; the last call wins."""
    verbose = verbose or verbose_requested()
    quiet_filters = [("ignore", message) for message in QUIET_WARNINGS]
    warnings.filters[:] = [f for f in warnings.filters if (f[0], getattr(f[1], "pattern", None)) not in quiet_filters]
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        for name, value in _QUIETED_ENV.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        _QUIETED_ENV.clear()
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for name, value in QUIET_ENV.items():
        if name not in os.environ:  # a value the user set is theirs
            os.environ[name] = _QUIETED_ENV[name] = value
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def settings() -> FarmSettings:
    """Settings from the environment; a configuration error ends the command with its reason."""
    return load_settings()


def run_app(app: typer.Typer) -> None:
    """Run the Typer app; a :class:`FarmError` prints one clear line and exits 2 (user error)
    or 1 (everything else) instead of a traceback."""
    try:
        app()
    except FarmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2 if isinstance(exc, ValueError) else 1)
