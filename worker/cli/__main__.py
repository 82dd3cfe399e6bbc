"""``python -m worker.cli``: the ``postroom`` command (the worker group starts its processes so)."""

from worker.cli import main

main()
