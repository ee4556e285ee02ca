"""`python -m agentbus.cli`: the same command as `agentbus` (how `up` and the supervisor start processes)."""

from agentbus.cli import main

main(prog_name="agentbus")
