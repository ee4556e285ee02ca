"""The docker spawner against a real engine: containers on the host network run sessions, a killed
container is replaced, and a restarted supervisor adopts the containers its predecessor left."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.supervisor.docker_spawner import LABEL, ContainerHandle, DockerSpawner, passed_env
from services.supervisor.pools import Fleet, PoolSpec
from services.supervisor.spawner import Spawners
from services.supervisor.supervisor import Supervisor
from tests.docker_env import agentbus_image, docker_client
from tests.helpers import supervising, ticks_pass, until

if TYPE_CHECKING:
    import docker

__all__ = ["agentbus_image", "docker_client"]  # fixtures, imported so pytest sees them here


def respond(delay: float) -> Any:
    def _respond(request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(delay)
        if any(m["role"] == "assistant" for m in request["messages"]):
            return text_response("done in a container")
        return tool_use_response("write_file", {"path": "x.txt", "content": "x"})

    return _respond


@pytest.fixture
def containers(docker_client: docker.DockerClient, prefix: str) -> Iterator[list[Any]]:
    """This test's containers, listed on demand; whatever is left at the end (and the
    workspace volume) is removed."""
    found: list[Any] = []
    yield found
    for c in _mine(docker_client, prefix):
        c.remove(force=True)
    for volume in docker_client.volumes.list(filters={"name": f"{prefix}-work"}):
        volume.remove(force=True)


def _mine(client: docker.DockerClient, prefix: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": [f"{LABEL}.prefix={prefix}"]}))


def _pool(image: str, api: FakeMessagesAPI | None = None, **kw: Any) -> PoolSpec:
    env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test"} if api else {}
    model = "anthropic:claude-sonnet-4-6" if api else "scripted:demo"
    return PoolSpec(name="p", model=model, spawner="docker", image=image, env=env, concurrency=1, **kw)


def supervised(settings: Settings, tmp_path: Path, client: docker.DockerClient, spec: PoolSpec) -> Any:
    spawner = DockerSpawner(settings, tmp_path / "logs", client=client, environ={})
    return supervising(settings, Fleet({"p": spec}, max_workers=4), Spawners({"docker": spawner}))


@pytest.mark.timeout(240)
async def test_docker_workers_run_sessions_on_the_host_network_and_leave_nothing_behind(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    agentbus_image: str,
    containers: list[Any],
    prefix: str,
) -> None:
    with FakeMessagesAPI(responder=respond(1.0)) as api:
        async with supervised(settings, tmp_path, docker_client, _pool(agentbus_image, api, min=1, max=2)) as sup:
            sids = [await client.submit(f"task {i}", pool="p") for i in range(4)]
            states = [await client.wait(sid, timeout=120) for sid in sids]
            running = _mine(docker_client, prefix)
            workers = await client.workers()
            handles = list(sup.pools["p"].workers)
    assert [s.status for s in states] == ["completed"] * 4
    assert len(handles) == 2, "the backlog brought the pool from min 1 to max 2"
    assert len(running) == 2, "the pool's workers are containers"
    for c in running:
        assert c.attrs["HostConfig"]["NetworkMode"] == "host"
        assert c.attrs["Config"]["User"] == "agentbus"  # the image's non-root user
        assert c.labels[f"{LABEL}.pool"] == "p"
        assert not any("docker.sock" in m.get("Source", "") for m in c.attrs["Mounts"])
    assert workers and {w.container for w in workers} <= {c.name for c in running}, "the registry names them"
    assert _mine(docker_client, prefix) == [], "shutdown stops and removes every container"
    for h in handles:
        assert isinstance(h, ContainerHandle)
        assert (tmp_path / "logs" / f"{h.worker_id}.log").read_bytes(), "the container's output is kept"


@pytest.mark.timeout(240)
async def test_a_killed_container_is_replaced_and_its_session_completes(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    agentbus_image: str,
    containers: list[Any],
) -> None:
    with FakeMessagesAPI(responder=respond(2.0)) as api:
        spec = _pool(agentbus_image, api, min=1, max=1, ack_wait_s=3.0)
        async with supervised(settings, tmp_path, docker_client, spec) as sup:
            sid = await client.submit("survive", pool="p")
            await until(lambda: _running(client, sid), "the session to run", timeout=90)
            victim = sup.pools["p"].workers[0]
            assert isinstance(victim, ContainerHandle)
            await asyncio.to_thread(victim.container.kill)  # SIGKILL, as a crash would
            state = await client.wait(sid, timeout=120)
            replacement = sup.pools["p"].workers[0]
    assert state.status == "completed"
    assert replacement.worker_id != victim.worker_id
    assert sup.replaced == 1


async def _running(client: agentbus.Client, sid: str) -> bool:
    return (await client.state(sid)).status == "running"


@pytest.mark.timeout(240)
async def test_a_restarted_supervisor_adopts_the_containers_it_finds(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    agentbus_image: str,
    containers: list[Any],
    prefix: str,
) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text(
        f'[pools.p]\nmodel = "scripted:demo"\nspawner = "docker"\nimage = "{agentbus_image}"\nmin = 1\nmax = 1\n'
    )
    cmd = [sys.executable, "-m", "agentbus.cli", "supervisor", "--pools", str(pools),
           "--nats", settings.nats_url, "--prefix", prefix, "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        await until(lambda: _registered(client, 1), "the first supervisor's container to register", timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no drain, the container keeps running
        first.wait()
    [orphan] = _mine(docker_client, prefix)
    assert orphan.status == "running"

    async with supervised(settings, tmp_path, docker_client, _pool(agentbus_image, min=1, max=1)) as sup:
        await ticks_pass(sup, 5)  # nothing new may be started
        adopted = [w.worker_id for w in sup.pools["p"].workers]
        during = [c.name for c in _mine(docker_client, prefix)]
    assert adopted == [orphan.labels[f"{LABEL}.worker"]]
    assert during == [orphan.name]
    assert _mine(docker_client, prefix) == [], "the adopted container is drained like its own"


async def _registered(client: agentbus.Client, n: int) -> bool:
    return len([w for w in await client.workers() if w.container]) == n


async def test_an_exited_container_found_at_start_is_removed_and_replaced(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    agentbus_image: str,
    containers: list[Any],
    prefix: str,
) -> None:
    labels = {f"{LABEL}.role": "agent", f"{LABEL}.prefix": prefix, f"{LABEL}.pool": "p", f"{LABEL}.worker": "p-old-1"}
    dead = docker_client.containers.run(
        agentbus_image, ["--version"], name=f"{prefix}-p-old-1", labels=labels, network_mode="host", detach=True
    )
    dead.wait(timeout=60)
    async with supervised(settings, tmp_path, docker_client, _pool(agentbus_image, min=1, max=1)) as sup:
        await until(lambda: _size(sup, 1), "a fresh worker", timeout=60)
        names = [c.name for c in _mine(docker_client, prefix)]
        worker = sup.pools["p"].workers[0].worker_id
    assert f"{prefix}-p-old-1" not in names
    assert worker != "p-old-1"
    assert b"agentbus" in (tmp_path / "logs" / "p-old-1.log").read_bytes(), "its output was kept before removal"


async def _size(sup: Supervisor, n: int) -> bool:
    return len(sup.pools["p"].workers) == n


_KILLED_SUPERVISOR = """
import os, signal, sys
from pathlib import Path
from agentbus.config import Settings
from services.supervisor.docker_spawner import DockerSpawner
spawner = DockerSpawner(Settings(), Path(sys.argv[2]), agent_creds=sys.argv[1])
print(spawner.creds_for_containers(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a crash: no exit handler runs
"""


def test_a_supervisor_removes_the_credentials_copies_of_supervisors_that_died_and_only_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    from services.supervisor.docker_spawner import CREDS_DIR_PREFIX

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    original = tmp_path / "agent.creds"
    original.write_text("secret")
    original.chmod(0o600)
    env = {**os.environ, "TMPDIR": str(tmp)}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SUPERVISOR, str(original), str(tmp_path / "logs")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = Path(killed.stdout.strip())
    assert left.read_text() == "secret", "the crash left a copy behind, as one does"

    def folder(name: str, pid: str | None) -> Path:
        made = tmp / f"{CREDS_DIR_PREFIX}{name}"
        made.mkdir()
        (made / "agent.creds").write_text("secret")
        if pid is not None:
            (made / "pid").write_text(pid)
        return made

    alive = folder("alive", str(os.getpid()))  # a supervisor still running
    making = folder("making", None)  # being made, or from a version without the pid file
    garbled = folder("garbled", "not a pid")
    elsewhere = tmp_path / f"{CREDS_DIR_PREFIX}linked"
    elsewhere.mkdir()
    (elsewhere / "pid").write_text("999999999")  # no such process
    (tmp / f"{CREDS_DIR_PREFIX}link").symlink_to(elsewhere)
    other_prefix = tmp / "something-else"
    other_prefix.mkdir()
    (other_prefix / "pid").write_text("999999999")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    spawner = DockerSpawner(Settings(), tmp_path / "logs", agent_creds=str(original))
    mine = Path(spawner.creds_for_containers()).parent

    assert not left.parent.exists(), "the dead supervisor's copy is removed"
    for kept in (alive, making, garbled, elsewhere, other_prefix, mine):
        assert kept.exists(), kept
    assert (mine / "pid").read_text() == str(os.getpid())


def test_agent_containers_get_model_tracing_and_agentbus_settings_and_nothing_else() -> None:
    env = {
        "ANTHROPIC_API_KEY": "k",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "AGENTBUS_REPLICAS": "3",
        "AGENTBUS_WORKER_ID": "the-supervisors-own",
        "DOCKER_HOST": "unix:///var/run/docker.sock",
        "AWS_SECRET_ACCESS_KEY": "x",
        "HOME": "/root",
    }
    assert passed_env(env) == {
        "ANTHROPIC_API_KEY": "k",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "AGENTBUS_REPLICAS": "3",
    }


async def test_a_worker_that_cannot_start_is_retried_and_the_supervisor_keeps_going(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: docker.DockerClient,
    containers: list[Any],
    prefix: str,
) -> None:
    spec = _pool("agentbus-no-such-image:none", min=1, max=2)  # not built; pools don't pull by default
    async with supervised(settings, tmp_path, docker_client, spec) as sup:
        await until(lambda: _failed(sup, 2), "two failed starts (the second after a backoff)", timeout=120)
        reply = await client.request_workers("p", 1)
        assert sup.pools["p"].workers == []
    assert reply.granted == 0
    assert "cannot start a worker" in reply.reason or "backing off after failed starts" in reply.reason
    assert _mine(docker_client, prefix) == [], "no half-created container is left"


async def _failed(sup: Supervisor, n: int) -> bool:
    return sup.spawn_failures >= n


def test_containers_get_a_copy_of_the_agent_credentials_only_they_and_the_supervisor_can_read(
    tmp_path: Path,
) -> None:
    import os
    import stat

    original = tmp_path / "agent.creds"
    original.write_text("first")
    original.chmod(0o600)
    spawner = DockerSpawner(Settings(), tmp_path / "logs", agent_creds=str(original))

    copy = Path(spawner.creds_for_containers())
    assert copy.read_text() == "first" and copy != original
    folder = copy.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.geteuid()  # no other host user
    mode = stat.S_IMODE(copy.stat().st_mode)
    if os.geteuid() == 0:
        assert (copy.stat().st_uid, mode) == (10001, 0o600)  # the image's user, and only it
    else:
        assert mode == 0o644  # inside the private folder: only the read-only bind mount shows it

    time.sleep(0.01)
    original.write_text("rotated")
    os.utime(original)
    assert Path(spawner.creds_for_containers()).read_text() == "rotated"  # rotated credentials reach new containers
