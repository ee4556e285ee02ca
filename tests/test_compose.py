"""compose/: the files validate with the compose tool (ordinary run), say what the README
promises (parsed here), and a real engine runs them: up, submit from the host, see it
complete, down, up again, and the session is still in the log."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

import agentbus
from agentbus.config import Settings
from agentbus.messages import VerdictRecorded
from services.supervisor.pools import load_pools
from tests.docker_env import ROOT, agentbus_image, docker_client, unavailable
from tests.helpers import free_port

if TYPE_CHECKING:
    import docker

__all__ = ["agentbus_image", "docker_client"]  # fixtures

COMPOSE = ROOT / "compose"
ROLES = ("router", "evaluator", "supervisor", "agents")
VARIANTS = {
    "single server": ["compose.yaml"],
    "cluster": ["compose.yaml", "cluster.yaml"],
    "host network": ["host-network.yaml"],
}


def compose_tools() -> list[list[str]]:
    """Every compose command on this machine: the v2 plugin and the standalone v1."""
    tools = []
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            tools.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    return tools


def _no_tool() -> None:
    unavailable("neither `docker compose` nor `docker-compose` is installed (.ci/docker-setup installs docker-compose)")


def _clean_env() -> dict[str, str]:
    """What finds the compose tool and its plugins, and none of the variables the files read."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / name).read_text())
    return data


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_compose_variant_validates_with_the_compose_tool(variant: str) -> None:
    tools = compose_tools()
    if not tools:
        _no_tool()
    files = [arg for name in VARIANTS[variant] for arg in ("-f", str(COMPOSE / name))]
    for tool in tools:
        # an empty environment: the defaults alone must make a valid file (no .env needed)
        out = subprocess.run([*tool, *files, "config"], capture_output=True, text=True, check=False, env=_clean_env())
        assert out.returncode == 0, f"{' '.join(tool)} config ({variant}): {out.stderr}"
        merged = yaml.safe_load(out.stdout)
        assert set(ROLES) <= set(merged["services"])


def test_one_image_serves_every_role_and_nats_keeps_its_store_on_a_named_volume() -> None:
    spec = _load("compose.yaml")
    services = spec["services"]
    images = {services[name]["image"] for name in (*ROLES, "nats")}
    assert images == {"agentbus:${AGENTBUS_TAG:-latest}"}
    assert [services[r]["command"][0] for r in ROLES] == ["router", "evaluator", "supervisor", "agent"]
    nats = services["nats"]
    assert "nats-data:/data" in nats["volumes"] and "nats-data" in spec["volumes"]
    assert "./nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert 'store_dir: "/data"' in (COMPOSE / "nats.conf").read_text()
    assert "js-enabled-only" in " ".join(nats["healthcheck"]["test"])
    for name, service in services.items():
        mounts = " ".join(service.get("volumes", []))
        assert "docker.sock" not in mounts, f"{name} must not get the engine socket"
    for role in ROLES:
        assert services[role]["environment"]["AGENTBUS_CONNECT_WAIT_S"], "every process waits for NATS"
    # authorization: every process reads its own credentials, by path, from a read-only volume
    creds = {r: services[r]["environment"]["AGENTBUS_CREDS"] for r in ROLES}
    assert creds == {
        "router": "/creds/service/service.creds",
        "evaluator": "/creds/service/service.creds",
        "supervisor": "/creds/service/service.creds",
        "agents": "/creds/agent/agent.creds",
    }
    assert services["supervisor"]["environment"]["AGENTBUS_AGENT_CREDS"] == "/creds/agent/agent.creds"
    assert "creds-service:/creds/service:ro" not in services["agents"]["volumes"], "agents never see service creds"
    for role in ROLES:
        assert all(v.endswith(":ro") for v in services[role]["volumes"] if v.startswith("creds-"))
    assert "auth init" in " ".join(nats["entrypoint"]) and "nats-auth:/auth" in nats["volumes"]
    assert 'include "../../auth/authorization.conf"' in (COMPOSE / "nats.conf").read_text()


def test_the_cluster_variant_runs_three_servers_and_three_replicas() -> None:
    services = _load("cluster.yaml")["services"]
    nodes = [services[n]["command"] for n in ("nats", "nats-2", "nats-3")]
    names = {next(a for a in cmd if a.startswith("--server_name=")) for cmd in nodes}
    assert len(names) == 3, "JetStream in a cluster needs a distinct server name per node"
    for cmd in nodes:
        assert "--routes=nats://nats:6222,nats://nats-2:6222,nats://nats-3:6222" in cmd
    for role in ROLES:
        env = services[role]["environment"]
        assert env["AGENTBUS_REPLICAS"] == "3"
        assert env["AGENTBUS_NATS_URL"].count("nats://") == 3


def test_every_env_example_setting_is_used_and_the_pools_file_serves_the_agents_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = (COMPOSE / ".env.example").read_text()
    keys = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.MULTILINE))
    used = (COMPOSE / "compose.yaml").read_text() + (COMPOSE / "pools.toml").read_text()
    assert {k for k in keys if f"${{{k}" not in used and k not in used} == set()
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    fleet = load_pools(COMPOSE / "pools.toml")
    agents_pool = next(a for a in _load("compose.yaml")["services"]["agents"]["command"] if a.startswith("--pool="))
    assert agents_pool.removeprefix("--pool=") in fleet.pools, "the agents service serves a pool the supervisor knows"
    assert set(fleet.pools) == {"general", "fast"}
    assert {p.model for p in fleet.pools.values()} == {"scripted:demo"}  # offline with an empty .env
    assert (fleet.pools["general"].budget.max_usd, fleet.pools["fast"].budget.max_usd) == (2.0, 0.5)


# -- a real engine ------------------------------------------------------------------------


class Deployment:
    def __init__(self, tool: list[str], project: str, env_file: Path) -> None:
        self.base = [*tool, "-p", project, "-f", str(COMPOSE / "host-network.yaml"), "--env-file", str(env_file)]

    def run(self, *args: str, timeout: float = 180) -> str:
        out = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False)
        assert out.returncode == 0, f"compose {' '.join(args)}: {out.stdout}\n{out.stderr}"
        return out.stdout + out.stderr

    def admin_creds(self, where: Path) -> str:
        """What the README tells the host's user to do: copy the admin's credentials out of nats."""
        # bounded per try: an exec into a container that is still starting can hang, not fail
        where.write_text(self.run("exec", "-T", "nats", "cat", "/auth/admin.creds", timeout=15))
        return str(where)

    def logs(self) -> str:
        out = subprocess.run([*self.base, "logs", "--no-color"], capture_output=True, text=True, check=False)
        return out.stdout[-4000:]


@pytest.fixture
def deployment(
    docker_client: docker.DockerClient, agentbus_image: str, tmp_path: Path
) -> Iterator[tuple[Deployment, str]]:
    tools = compose_tools()
    if not tools:
        _no_tool()
    port = free_port()
    env_file = tmp_path / "compose.env"
    env_file.write_text(
        f"AGENTBUS_TAG={agentbus_image.split(':')[1]}\nNATS_PORT={port}\nNATS_MONITOR_PORT={free_port()}\n"
        f"NATS_SERVER_NAME=test-{port}\n"
    )
    deploy = Deployment(tools[-1], f"agentbustest{os.getpid()}x{port}", env_file)
    try:
        yield deploy, f"nats://127.0.0.1:{port}"
    finally:
        subprocess.run([*deploy.base, "down", "-v", "--remove-orphans"], capture_output=True, check=False)


async def _admin_creds(deploy: Deployment, tmp_path: Path) -> str:
    """The admin's credentials once the nats service has made them (it does on its first start)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            return deploy.admin_creds(tmp_path / "admin.creds")
        except (AssertionError, subprocess.TimeoutExpired):
            await asyncio.sleep(1)  # polling a starting container with a bound, not synchronising
    raise AssertionError("the nats service never made the admin's credentials:\n" + deploy.logs())


@pytest.mark.timeout(600)  # two compose ups, a session and a down on 2 cores
async def test_compose_up_runs_a_task_from_the_host_and_the_session_survives_down_and_up(
    deployment: tuple[Deployment, str], tmp_path: Path
) -> None:
    deploy, url = deployment
    deploy.run("up", "-d", "--no-build")
    settings = Settings(nats_url=url, connect_wait_s=120, creds=await _admin_creds(deploy, tmp_path))
    try:
        async with agentbus.connect(settings=settings) as client:
            # the check runs in the evaluator's container, on the workspace the agent wrote
            sid = await client.submit(
                "write a haiku about message queues", pool="general", checks=["test -s haiku.txt"]
            )
            state = await client.wait(sid, timeout=180)
            verdicts = [r.event for r in await client.show(sid) if isinstance(r.event, VerdictRecorded)]
            before = [r.seq for r in await client.show(sid)]
    except BaseException:
        print(deploy.logs())
        raise
    assert state.status == "completed", deploy.logs()
    assert "haiku.txt" in (state.result or "")
    assert [v.verdict for v in verdicts] == ["satisfied"], "the evaluator saw the agent's file"

    deploy.run("down")  # no -v: the named volume keeps the store
    deploy.run("up", "-d", "--no-build")
    async with agentbus.connect(settings=settings) as client:
        again = await client.state(sid)
        after = [r.seq for r in await client.show(sid)]
        listed = [s.session_id for s in await client.sessions()]
    assert again.status == "completed"
    assert after == before, "the whole log came back, nothing more and nothing less"
    assert sid in listed
