"""What the model benches' command lines share: model size, device and dtype, torch's thread
count, the JSON output, and diffusers / transformers kept quiet while timing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--size tiny|real``, ``--device``, ``--dtype``."""
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)


def add_output_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """``--threads`` (torch CPU threads) and ``--json FILE``."""
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)


def prepare_libraries(threads: int | None = None) -> None:
    """Set torch's thread count (when given) and silence progress bars and notices."""
    import diffusers
    import torch
    from transformers.utils import logging as transformers_logging

    if threads:
        torch.set_num_threads(threads)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # deprecated-pipeline notices
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def write_json(path: Path | None, result: Any) -> None:
    if path:
        path.write_text(json.dumps(result, indent=2) + "\n")


def per_family(
    families: list[str], run: Callable[[str], dict[str, Any]], show: Callable[[dict[str, Any]], None], out: Path | None
) -> list[dict[str, Any]]:
    """``run(family)`` for each family, each result shown as it comes; all of them written to ``out``."""
    results = []
    for family in families:
        results.append(run(family))
        show(results[-1])
    write_json(out, results)
    return results
