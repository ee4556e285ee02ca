"""`agentbus mcp`: serve agentbus to MCP clients (Claude Code, ...), over stdio or Streamable HTTP.

Loaded only when run (listed in `LAZY`): the `mcp` SDK is heavy, and `agentbus --help` never imports it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from agentbus.cli.options import PORT, nats_option, run, settings_from

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _address(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value  # `--http 8765`: loopback
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(PORT.convert(int(port), param, ctx))
    except (ValueError, click.BadParameter):
        raise click.BadParameter(f"expected HOST:PORT or PORT, not {value!r}", ctx, param) from None


@click.command(name="mcp")
@click.option(
    "--http", "http", callback=_address, metavar="[HOST:]PORT",
    help="Serve Streamable HTTP at http://HOST:PORT/mcp (HOST defaults to 127.0.0.1) instead of stdio.",
)  # fmt: skip
@click.option(
    "--tokens", "tokens_file", metavar="FILE", envvar="AGENTBUS_MCP_TOKENS",
    help="With --http: bearer tokens, each mapped to a credentials file ([callers.NAME] token=..., creds=...; "
    "mode 0600). Without it the only caller is this process's credentials, with a fresh token in --token-file.",
)  # fmt: skip
@click.option(
    "--token-file", default=".agentbus/mcp.token", show_default=True, type=click.Path(path_type=Path),
    help="With --http and no --tokens: where the fresh bearer token is written (mode 0600).",
)  # fmt: skip
@nats_option
def command(
    http: tuple[str, int] | None, tokens_file: str | None, token_file: Path, nats_url: str | None, prefix: str
) -> None:
    """Serve agentbus as an MCP server: stdio by default (`claude mcp add agentbus -- agentbus mcp`).

    Tools: submit, result, events, say, interrupt, approve, cancel, resume, inbox, sessions, pools;
    resources agentbus://session/{id} and agentbus://inbox, with subscriptions. Every call acts with
    the caller's credentials (stdio: this process's --creds; HTTP: the bearer token's).
    """
    # stdout belongs to the protocol: every log line goes to stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="agentbus mcp: %(levelname)s %(message)s")
    settings = settings_from(nats_url, prefix)
    from agentbus import mcp

    if http is None:
        if tokens_file:
            raise click.UsageError("--tokens applies to --http only (over stdio the caller is this process)")
        run(lambda: mcp.serve_stdio(settings))
        return
    host, port = http
    if host not in LOOPBACK:
        click.echo(f"agentbus mcp: warning: listening on {host}, beyond this machine: bearer tokens and sessions "
                   "cross the network in clear text unless a TLS proxy stands in front", err=True)  # fmt: skip
    run(lambda: mcp.serve_http(settings, host, port, tokens_file=tokens_file, token_file=token_file))
