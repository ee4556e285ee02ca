"""The sandbox from the pools file to the agent's command line, and inside a docker worker on a real engine."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import ToolCallCompleted
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.supervisor.docker_spawner import security_opt
from services.supervisor.pools import PoolSpec, load_pools
from services.supervisor.spawner import agent_args
from tests.docker_env import agentbus_image, docker_client
from tests.test_docker_spawner import containers, supervised

if TYPE_CHECKING:
    import docker

__all__ = ["agentbus_image", "containers", "docker_client"]  # fixtures, imported so pytest sees them here

SECRET = "sk-ant-docker-" + secrets.token_hex(8)


def test_the_pools_file_sets_sandbox_network_and_tool_env_and_they_reach_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(
        '[pools.a]\nmodel = "scripted:demo"\ntools = ["bash"]\nsandbox = "none"\nnetwork = true\n'
        'tool_env = ["GITHUB_TOKEN", "MODE=ci"]\n[pools.b]\nmodel = "scripted:demo"\n'
    )
    fleet = load_pools(path)
    a, b = fleet.pools["a"], fleet.pools["b"]
    assert (a.sandbox, a.network, a.tool_env) == ("none", True, ("GITHUB_TOKEN", "MODE=ci"))
    assert (b.sandbox, b.network, b.tool_env) == ("bwrap", False, ())
    args = agent_args(a, Settings())
    assert args[args.index("--sandbox") + 1] == "none"
    assert "--network" in args and "--tool-env=GITHUB_TOKEN" in args and "--tool-env=MODE=ci" in args
    assert "--no-network" in agent_args(b, Settings())


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('sandbox = "docker"', "sandbox must be 'bwrap' or 'none'"),
        ('tool_env = ["ANTHROPIC_API_KEY"]', "never reach a tool"),
        ('tool_env = ["AGENTBUS_NATS_URL"]', "never reach a tool"),
        ('network = "maybe"', "network must be true or false"),
    ],
)
def test_a_pool_cannot_hand_a_tool_the_bus_or_the_key(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(f'[pools.a]\nmodel = "scripted:demo"\n{line}\n')
    with pytest.raises(UsageError, match=error):
        load_pools(path)


def test_docker_agents_get_the_sandboxs_needs_only_when_they_may_run_commands() -> None:
    plain = PoolSpec(name="p", model="m", spawner="docker")
    bash = PoolSpec(name="p", model="m", spawner="docker", tools=("read_file", "bash"))
    unconfined = PoolSpec(name="p", model="m", spawner="docker", tools=("bash",), sandbox="none")
    assert security_opt(plain) == security_opt(unconfined) == ["no-new-privileges:true"]
    assert security_opt(bash) == ["no-new-privileges:true", "seccomp=unconfined", "apparmor=unconfined"]


def _responder(port: str) -> Any:
    def respond(request: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(request["messages"])
        if any(m["role"] == "assistant" for m in request["messages"]):
            return text_response("done")
        if "PLANT" in text:
            return tool_use_response("write_file", {"path": "notes.txt", "content": "VICTIM-DATA"})
        victim = text.split("PROBE ")[1].split('"')[0].split("\\")[0]
        command = (
            f"id; pwd; env; cat /proc/*/environ; cat /work/{victim}/notes.txt ../{victim}/notes.txt; ls /work; "
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)\" 2>&1 | tail -1; "
            "true"
        )
        return tool_use_response("bash", {"command": command})

    return respond


@pytest.mark.timeout(300)
async def test_a_docker_workers_bash_cannot_read_the_agents_environment_another_workspace_or_the_bus(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    agentbus_image: str,
    containers: list[Any],
    prefix: str,
) -> None:
    port = settings.nats_url.rsplit(":", 1)[1]
    with FakeMessagesAPI(responder=_responder(port)) as api:
        env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": SECRET}
        spec = PoolSpec(name="p", model="anthropic:claude-sonnet-4-6", spawner="docker", image=agentbus_image,
                        env=env, tools=("read_file", "write_file", "bash"), concurrency=1, min=1, max=1)  # fmt: skip
        async with supervised(settings, tmp_path, docker_client, spec) as sup:
            victim = await client.submit("PLANT", pool="p")
            assert (await client.wait(victim, timeout=180)).status == "completed"
            probe = await client.submit(f"PROBE {victim}", pool="p")
            state = await client.wait(probe, timeout=120)
            worker = sup.pools["p"].workers[0]
            attrs = worker.container.attrs  # type: ignore[attr-defined]
    assert state.status == "completed", state.reason
    [result] = [r.event for r in await client.show(probe) if isinstance(r.event, ToolCallCompleted)]
    seen = result.output
    assert "uid=1000(tool)" in seen and "PWD=/work" in seen, f"ran in the sandbox: {seen[:500]}"
    assert SECRET not in seen, "the agent's API key"
    assert "VICTIM-DATA" not in seen and f"{victim}/notes.txt: No such file or directory" in seen
    assert "ConnectionRefusedError" in seen, "no route to the bus"
    assert settings.nats_url not in seen
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert "seccomp=unconfined" in attrs["HostConfig"]["SecurityOpt"]
    assert attrs["HostConfig"]["MaskedPaths"] == [], "a fresh /proc can be mounted in the sandbox"
    assert attrs["Config"]["User"] == "agentbus"
