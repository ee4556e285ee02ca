"""`agentbus supervisor`: not built yet (see its issue); the command keeps the layout whole."""

from __future__ import annotations

import sys

import click


@click.command(name="supervisor", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def command() -> None:
    """The supervisor service (not built yet)."""
    click.echo("agentbus supervisor: not built yet in this version", err=True)
    sys.exit(1)
