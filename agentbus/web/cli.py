"""`agentbus web`: the web view, served until Ctrl-C (loaded only when it runs: `--help` stays fast)."""

from __future__ import annotations

import click

from agentbus.cli.options import PORT, settings_from


@click.command()
@click.option("--port", type=PORT, default=8765, show_default=True, help="HTTP port (0: any free port).")
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to listen on; anything but loopback exposes the view to the network (use TLS in front).",
)  # fmt: skip
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
    help="Another host name the view is reached by (besides 127.0.0.1 and localhost); repeatable.",
)  # fmt: skip
@click.option(
    "--pools", "pools_file", metavar="FILE", help="The supervisor's pools file: the fleet page shows its ceilings."
)
@click.option(
    "--nats", "nats_url", default=None, metavar="URL",
    help="NATS server each person connects to as themselves [env AGENTBUS_NATS_URL, then NATS_URL].",
)  # fmt: skip
@click.option("--prefix", envvar="AGENTBUS_PREFIX", default="agentbus", show_default=True, help="Namespace.")
def web(
    port: int, host: str, allowed_hosts: tuple[str, ...], pools_file: str | None, nats_url: str | None, prefix: str
) -> None:
    """The web view: inbox, sessions, a live session page, the fleet. People log in with their credentials."""
    from agentbus.web.server import serve

    settings = settings_from(nats_url, prefix)
    serve(settings, host=host, port=port, allowed_hosts=allowed_hosts, pools_file=pools_file)
