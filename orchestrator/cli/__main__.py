"""`python -m orchestrator.cli ...`: the `orchestrator` command."""

from orchestrator.cli.commands import main

main()
