"""`agentbus router`: route submissions to agent pools."""

from __future__ import annotations

import logging

import click

from agentbus.bus import Bus
from agentbus.cli.options import nats_option, run, settings_from
from agentbus.service import serve_until_signalled
from services.router.router import Router
from services.router.routes import DEFAULT_POOL, load_routes


@click.command(name="router")
@click.option("--routes", "routes_file", type=click.Path(dir_okay=False), help="Routes file (TOML).")
@click.option("--default-pool", default=DEFAULT_POOL, show_default=True, help="Pool when no rule matches.")
@nats_option
def command(routes_file: str | None, default_pool: str, nats_url: str | None, prefix: str) -> None:
    """Route submissions: explicit pool, else the first matching rule, else the default pool."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    table = (
        load_routes(routes_file, default_pool=default_pool)
        if routes_file
        else load_routes(None, default_pool=default_pool)
    )
    settings = settings_from(nats_url, prefix)

    async def main() -> None:
        bus = await Bus.connect(settings, name="agentbus-router")
        router = Router(bus, table)
        await serve_until_signalled(router, bus)

    run(main)
