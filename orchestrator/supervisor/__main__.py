"""`python -m orchestrator.supervisor CONFIG`: the detached supervisor (`orchestrator start --detach`)."""

from orchestrator.supervisor.core import main

main()
