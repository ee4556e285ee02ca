"""`agentbus agent`: one agent process serving one pool."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import click

from agentbus.bus import Bus
from agentbus.cli.options import budget_options, nats_option, pool_name, run, settings_from
from agentbus.config import DEFAULT_TOOLS
from agentbus.mcp.servers import parse_option
from agentbus.messages import Budget
from agentbus.service import freeze_heap
from services.agent.worker import AgentConfig, serve


@click.command(name="agent")
@click.option("--pool", required=True, callback=pool_name, help="Pool whose work queue this agent serves.")
@click.option("--model", "model_spec", required=True, help="anthropic:<model-id> or scripted:<file.json>.")
@click.option(
    "--tools",
    default=",".join(DEFAULT_TOOLS),
    show_default=True,
    help="Comma-separated tools (bash is off unless listed; plug-ins by entry-point name).",
)
@click.option("--workdir", default=".agentbus/work", show_default=True, help="Per-session workspaces go here.")
@click.option(
    "--concurrency", default=4, show_default=True, help="Sessions at once (delegating parents wait in a slot)."
)
@click.option(
    "--max-output-tokens", "max_tokens", default=4096, show_default=True, help="max_tokens of each model call."
)
@click.option(
    "--ack-wait", default=60.0, show_default=True, help="Seconds before an unacked task goes to another agent."
)
@click.option("--max-deliver", default=5, show_default=True, help="Deliveries before a task's session is failed.")
@budget_options("Pool default budget per session")
@click.option("--no-progress", default=3, show_default=True, help="Pause after N turns without progress (0: off).")
@click.option(
    "--approve", "approve", multiple=True, help="A tool whose calls wait for a person's approval (repeatable)."
)
@click.option("--approval-timeout", type=float, help="Seconds an approval may wait (default: forever).")
@click.option(
    "--on-approval-timeout",
    type=click.Choice(["deny", "pause"]),
    default="deny",
    show_default=True,
    help="What a timed-out approval does.",
)
@click.option(
    "--allow-model",
    "allowed_models",
    multiple=True,
    metavar="SPEC",
    help="A model a session may name besides --model (submit --model, a route); repeatable. Others are refused.",
)
@click.option(
    "--sandbox",
    type=click.Choice(["bwrap", "none"]),
    default="bwrap",
    show_default=True,
    envvar="AGENTBUS_SANDBOX",
    help="Where bash (and plug-ins that run commands) run: bubblewrap, or none (unconfined, with a warning) "
    "[env AGENTBUS_SANDBOX].",
)
@click.option(
    "--network/--no-network", default=False, show_default=True, help="May sandboxed commands use the network?"
)
@click.option(
    "--tool-env",
    multiple=True,
    metavar="NAME[=VALUE]",
    help="A variable sandboxed commands get (repeatable): NAME passes this agent's value, NAME=VALUE sets one.",
)
@click.option(
    "--mcp", "mcp", multiple=True, metavar="NAME=JSON",
    help='An MCP server whose tools the agent offers as mcp__NAME__TOOL (repeatable): NAME={"command": [...]} '
    '(stdio, run in the sandbox with the --tool-env environment) or NAME={"url": "http://..."}.',
)  # fmt: skip
@click.option("--repo", metavar="PATH", help="A git repository: each session works in its own worktree and branch.")
@click.option("--base", metavar="REF", help="With --repo: where branches start [default: the checked-out branch].")
@click.option(
    "--review/--no-review", default=False, show_default=True, help="Ended sessions wait in the inbox for a review."
)
@nats_option
def command(
    pool: str,
    model_spec: str,
    tools: str,
    workdir: str,
    concurrency: int,
    max_tokens: int,
    ack_wait: float,
    max_deliver: int,
    budget: Budget,
    no_progress: int,
    approve: tuple[str, ...],
    approval_timeout: float | None,
    on_approval_timeout: str,
    allowed_models: tuple[str, ...],
    sandbox: str,
    network: bool,
    tool_env: tuple[str, ...],
    mcp: tuple[str, ...],
    repo: str | None,
    base: str | None,
    review: bool,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Run an agent: pull POOL's tasks, run the Claude tool-use loop, record every step."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model request is noise
    config = AgentConfig(
        pool=pool,
        model=model_spec,
        tools=tuple(t.strip() for t in tools.split(",") if t.strip()),
        workdir=Path(workdir),
        concurrency=max(1, concurrency),
        max_output_tokens=max_tokens,
        ack_wait_s=ack_wait,
        max_deliver=max_deliver,
        budget=budget,
        no_progress_turns=no_progress,
        approve=approve,
        approval_timeout_s=approval_timeout,
        on_approval_timeout="pause" if on_approval_timeout == "pause" else "deny",
        allowed_models=allowed_models,
        sandbox=sandbox,
        network=network,
        tool_env=tool_env,
        mcp=tuple(parse_option(entry) for entry in mcp),
        repo=repo,
        base=base,
        review=review,
    )
    settings = settings_from(nats_url, prefix)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bus = await Bus.connect(settings, name=f"agentbus-agent-{pool}")
        try:
            await serve(bus, config, stop, started=freeze_heap)
        finally:
            await bus.close()

    run(main)
