"""The `orchestrator` command (start, stop, status, validate, keygen, bench): commands, the live status
view (status_view) and `orchestrator bench` (bench/). May import every other part of the package.

The console script is `orchestrator.cli:main`; `python -m orchestrator.cli` runs the same.
"""

from orchestrator.cli.commands import main

__all__ = ["main"]
