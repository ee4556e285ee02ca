"""`agentbus supervisor`: start, scale and replace agent workers from a pools file."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from agentbus.bus import Bus
from agentbus.cli.options import nats_option, run, settings_from
from agentbus.service import serve_until_signalled
from services.supervisor.docker_spawner import DockerSpawner, engine
from services.supervisor.pools import check_models, check_repos, load_pools
from services.supervisor.spawner import ProcessSpawner, Spawner, Spawners, own_creds_warning
from services.supervisor.supervisor import Supervisor


@click.command(name="supervisor")
@click.option("--pools", "pools_file", required=True, type=click.Path(dir_okay=False), help="Pools file (TOML).")
@click.option("--log-dir", default=".agentbus/logs", show_default=True, help="One log file per worker.")
@click.option("--workdir", default=".agentbus/work", show_default=True, help="Session workspaces of the workers.")
@click.option("--check", is_flag=True, help="Check the pools file and each pool's model, then exit; starts nothing.")
@click.option(
    "--agent-creds",
    envvar="AGENTBUS_AGENT_CREDS",
    default="",
    metavar="FILE",
    help="Credentials (role agent) the workers get, by path in their environment [env AGENTBUS_AGENT_CREDS].",
)
@nats_option
def command(
    pools_file: str, log_dir: str, workdir: str, check: bool, agent_creds: str, nats_url: str | None, prefix: str
) -> None:
    """Keep every pool between min and max workers; replace the dead; SIGTERM drains them all."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s %(message)s")
    settings = settings_from(nats_url, prefix)
    fleet = load_pools(pools_file)
    if check:
        check_models(fleet)
        check_repos(fleet)
        click.echo(f"pools file {pools_file}: pools {', '.join(fleet.pools)}")
        return

    async def main() -> None:
        kinds: dict[str, Spawner] = {"process": ProcessSpawner(settings, Path(log_dir), Path(workdir), agent_creds)}
        if any(p.spawner == "docker" for p in fleet.pools.values()):
            # checked before anything starts, so a missing engine is one clear line
            client = await asyncio.to_thread(engine)
            kinds["docker"] = DockerSpawner(settings, Path(log_dir), client=client, agent_creds=agent_creds)
        bus = await Bus.connect(settings, name="agentbus-supervisor")
        if (warning := own_creds_warning(agent_creds, bus.identity.role)) is not None:
            logging.getLogger("agentbus.supervisor").warning(warning)
        supervisor = Supervisor(bus, fleet, Spawners(kinds))
        await serve_until_signalled(supervisor, bus)

    run(main)
