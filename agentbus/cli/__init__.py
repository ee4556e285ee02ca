"""The `agentbus` command: wiring only, from options to the client API and the services.

`sessions.py` holds the commands on sessions, `fleet.py` those on the system around them,
`options.py` what every command (and every service's command) shares. The four services come
from the `agentbus.services` entry-point group and are imported only when one of them runs; the
top-level help lists them from `SERVICES`, so `agentbus --help` imports none of them.

This module is the one place that turns an error into one line on stderr and its exit code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from agentbus.cli import control, fleet, repos, sessions
from agentbus.errors import AgentBusError

__all__ = ["EXIT_CODES", "SERVICES", "main"]

ENTRY_POINTS = "agentbus.services"

# The one-line help of each service command, shown by `agentbus --help` without importing the
# service; tests/test_cli_help.py checks each against the command's own docstring.
SERVICES = {
    "agent": "Run an agent: pull POOL's tasks, run the Claude tool-use loop, record every step.",
    "evaluator": "Grade results: checks sandboxed on a copy of the workspace, criteria by a grader model.",
    "router": "Route submissions: explicit pool, else the first matching rule, else the default pool.",
    "supervisor": "Keep every pool between min and max workers; replace the dead; SIGTERM drains them all.",
}

# Commands of this package that import more than `--help` may pay for (nkeys for `auth`):
# listed from here, loaded when run.
LAZY = {
    "auth": ("agentbus.cli.auth", "auth", "Users of a server started here: nkey credentials, one role each."),
    "schema": (
        "agentbus.cli.schema",
        "schema",
        "Payload schemas (subjects.md, Payloads): every family, or one with its fields; --json for the schema.",
    ),
    # issue 17: the MCP server (imports the `mcp` SDK)
    "mcp": ("agentbus.cli.mcp", "command", "Serve agentbus to MCP clients (Claude Code): stdio, or --http."),
    # web view (agentbus/web): Starlette and uvicorn load only when it runs
    "web": ("agentbus.web.cli", "web", "The web view: inbox, sessions, a live session page, the fleet."),
}

EXIT_CODES = {
    0: "ok",
    1: "any other error",
    2: "usage: a bad option, argument, file or session id",
    3: "no such session",
    4: "NATS unavailable: cannot reach it, or (server, up) its port or store directory is taken",
    5: "a waited-for session ended without success, or the wait timed out",
    6: "not permitted: the role does not allow it, or the credentials were refused",
    130: "interrupted (Ctrl-C)",
}

_SECTIONS = (
    ("Sessions", [str(c.name) for c in (*sessions.COMMANDS, *repos.COMMANDS)]),
    ("Steering (each an event in the session's log)", [str(c.name) for c in control.COMMANDS]),
    ("System", [*(str(c.name) for c in fleet.COMMANDS), *LAZY]),
    ("Services (each a long-running process)", list(SERVICES)),
)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"agentbus: {message}", err=True)
    sys.exit(code)


def _usage_line(err: click.ClickException) -> str:
    """A click error as one line, naming where to read more."""
    message = " ".join(err.format_message().split()).rstrip(".")
    ctx = getattr(err, "ctx", None)
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message


class _Group(click.Group):
    """Loads a service's command only when it is run, so `agentbus tap` never imports the SDKs."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:  # bad option or argument, unknown command
            _fail(_usage_line(err), err.exit_code)
        except AgentBusError as err:  # raised anywhere: reading files, in a coroutine, in a service
            _fail(str(err), err.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *SERVICES, *LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        found = super().get_command(ctx, name)
        if found is None and name in LAZY:
            module, attr, _ = LAZY[name]
            found = getattr(importlib.import_module(module), attr)
        return found if found is not None else _service(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Commands by section; a service's line comes from SERVICES, so nothing is imported."""
        names = [name for _, members in _SECTIONS for name in members]
        limit = formatter.width - 6 - max(len(name) for name in names)
        for title, members in _SECTIONS:
            rows = []
            for name in members:
                # a service stands in as a bare command carrying its help, never imported here
                short = SERVICES.get(name) or LAZY[name][2] if name in (*SERVICES, *LAZY) else ""
                cmd = super().get_command(ctx, name) or click.Command(name, help=short)
                rows.append((name, cmd.get_short_help_str(limit)))
            with formatter.section(title):
                formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Exit codes"):
            formatter.write_dl([(str(code), what) for code, what in EXIT_CODES.items()])
        with formatter.section("Shell completion"):
            formatter.write_text('bash: eval "$(_AGENTBUS_COMPLETE=bash_source agentbus)" (zsh_source, fish_source)')


def _service(name: str) -> click.Command | None:
    """The command an `agentbus.services` entry point names, imported now (and only now)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS, name=name):
        command = ep.load()
        if not isinstance(command, click.Command):
            raise AgentBusError(f"entry point {ep.value} ({ENTRY_POINTS}) is not a click command")
        return command
    return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(None, "-V", "--version", package_name="agentbus-runtime", prog_name="agentbus")
@click.pass_context
def main(ctx: click.Context) -> None:
    """agentbus: teams of Claude agents on NATS JetStream; a session is a durable stream.

    Every command that talks to the bus takes --nats URL and --prefix; `agentbus COMMAND --help`
    says more.
    """
    from agentbus import tracing

    name = ctx.invoked_subcommand if ctx.invoked_subcommand in SERVICES else "cli"
    ctx.call_on_close(tracing.setup(f"agentbus-{name}"))


for _command in (*sessions.COMMANDS, *repos.COMMANDS, *control.COMMANDS, *fleet.COMMANDS):
    main.add_command(_command)
