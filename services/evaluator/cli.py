"""`agentbus evaluator`: grade results in a separate context and send critique back."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from agentbus.bus import Bus
from agentbus.cli.options import nats_option, run, settings_from
from agentbus.models import model_from_spec
from agentbus.sandbox import open_sandbox
from agentbus.service import serve_until_signalled
from services.evaluator.evaluator import Evaluator
from services.evaluator.policy import PIVOT_AFTER


@click.command(name="evaluator")
@click.option(
    "--model",
    "model_spec",
    envvar="AGENTBUS_GRADER_MODEL",
    help="Grader for criteria: anthropic:<model-id> or scripted:<file> [env AGENTBUS_GRADER_MODEL].",
)
@click.option(
    "--pivot-after",
    default=PIVOT_AFTER,
    show_default=True,
    help="Failed rounds in a row on one criterion before the next round starts afresh (0: never).",
)
@click.option(
    "--workdir",
    default=".agentbus/work",
    show_default=True,
    envvar="AGENTBUS_WORKDIR",
    help="The agents' workspace root (their --workdir); a session's workspace is WORKDIR/<session id> "
    "[env AGENTBUS_WORKDIR].",
)
@click.option(
    "--sandbox",
    "sandbox_mode",
    type=click.Choice(["bwrap", "none"]),
    default="bwrap",
    show_default=True,
    envvar="AGENTBUS_SANDBOX",
    help="Where checks run: bubblewrap, or none (unconfined, with a warning) [env AGENTBUS_SANDBOX].",
)
@nats_option
def command(
    model_spec: str | None, pivot_after: int, workdir: str, sandbox_mode: str, nats_url: str | None, prefix: str
) -> None:
    """Grade results: checks sandboxed on a copy of the workspace, criteria by a grader model."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s evaluator %(levelname)s %(message)s")
    model = model_from_spec(model_spec) if model_spec else None
    settings = settings_from(nats_url, prefix)

    async def main() -> None:
        # before connecting: a host that cannot run the checks' sandbox refuses at once, in one line
        sandbox = open_sandbox(sandbox_mode, needed_by="the evaluator's checks")
        bus = await Bus.connect(settings, name="agentbus-evaluator")
        evaluator = Evaluator(bus, model, pivot_after=pivot_after, workdir=Path(workdir), sandbox=sandbox)
        await serve_until_signalled(evaluator, bus)

    run(main)
