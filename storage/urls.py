"""URLs shown to people: passwords hidden.

:func:`redact_url` lives in storage (the S3 store names its endpoint in messages, and storage
imports nothing from ``farm``); :mod:`farm.settings` re-exports it for the CLI and the settings
table.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced by ``***``, for display and logs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
