"""``python -m farm`` is the same as the ``farm`` command."""

from farm.cli import main

main()
