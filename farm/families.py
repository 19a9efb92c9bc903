"""Model families: the architectures a job runs on, each with its own GPU worker queue."""

from __future__ import annotations

from typing import Literal, get_args

Family = Literal["sd15", "sdxl", "svd"]
FAMILIES: tuple[str, ...] = get_args(Family)
