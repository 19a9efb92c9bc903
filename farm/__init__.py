"""Render farm for patched diffusion models.

Importing this package has no side effects: settings, engines and the Celery app are built in
entry points (the CLI, the worker, tests), never at import time.
"""

__version__ = "0.1.0"
