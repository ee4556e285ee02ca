"""Supervisor with the process spawner: scale to a backlog and back, replace a killed worker, grant extra workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.supervisor.pools import Fleet, PoolSpec, load_pools
from services.supervisor.spawner import ProcessHandle, ProcessSpawner
from services.supervisor.supervisor import Supervisor
from tests.helpers import supervising, ticks_pass, until


def slow(delay: float) -> Any:
    def respond(request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(delay)  # the fake API's own thread: a model that takes a while
        if any(m["role"] == "assistant" for m in request["messages"]):
            return text_response("done")
        return tool_use_response("write_file", {"path": "x.txt", "content": "x"})

    return respond


def supervised(settings: Settings, tmp_path: Path, api: FakeMessagesAPI, **pool: Any) -> Any:
    env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test"}
    spec = PoolSpec(name="p", model="anthropic:claude-sonnet-4-6", env=env, concurrency=1, **pool)
    spawner = ProcessSpawner(settings, tmp_path / "logs", tmp_path / "w")
    return supervising(settings, Fleet({"p": spec}, max_workers=4), spawner)


@pytest.mark.timeout(120)
async def test_a_pool_scales_up_to_serve_a_backlog_and_back_down_when_idle(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI(responder=slow(0.4)) as api:
        async with supervised(settings, tmp_path, api, min=1, max=3, idle_s=1.0) as sup:
            await until(lambda: _size(sup, 1), "the first worker", timeout=30)
            sids = [await client.submit(f"task {i}", pool="p") for i in range(8)]
            peak = await until(lambda: _size(sup, 3), "scale-up to max", timeout=30)
            states = [await client.wait(sid, timeout=60) for sid in sids]
            assert all(s.status == "completed" for s in states)
            await until(lambda: _size(sup, 1), "scale-down to min", timeout=30)
            workers = {s.owner for s in states}
    assert peak
    assert len(workers) >= 2  # the backlog really was shared


@pytest.mark.timeout(120)
async def test_one_waiting_task_starts_one_worker_not_one_per_tick(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """A new worker takes a second or two to come up; meanwhile the task still waits. Counting
    the starting worker's slots keeps the supervisor from starting another at every tick."""
    with FakeMessagesAPI(responder=slow(0.5)) as api:
        async with supervised(settings, tmp_path, api, min=0, max=3, idle_s=60) as sup:
            sid = await client.submit("just one", pool="p")
            assert (await client.wait(sid, timeout=60)).status == "completed"
            started = sup.started
    assert started == 1


async def _size(sup: Supervisor, n: int) -> bool:
    return len(sup.pools["p"].workers) == n


@pytest.mark.timeout(120)
async def test_a_killed_worker_is_replaced_and_its_session_completes(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI(responder=slow(1.5)) as api:
        async with supervised(settings, tmp_path, api, min=1, max=1, ack_wait_s=3.0) as sup:
            sid = await client.submit("survive", pool="p")
            await until(lambda: _running(client, sid), "the session to run", timeout=30)
            victim = sup.pools["p"].workers[0]
            assert isinstance(victim, ProcessHandle)
            victim.proc.send_signal(signal.SIGKILL)
            state = await client.wait(sid, timeout=90)
            replacement = sup.pools["p"].workers[0]
    assert state.status == "completed"
    assert replacement.worker_id != victim.worker_id
    assert sup.replaced == 1


async def _running(client: agentbus.Client, sid: str) -> bool:
    return (await client.state(sid)).status == "running"


async def test_extra_workers_are_granted_within_the_pool_max_and_refused_beyond_it(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI(responder=slow(0)) as api:
        async with supervised(settings, tmp_path, api, min=1, max=2, idle_s=60):
            await until(lambda: _registered(client, 1), "one registered worker", timeout=30)
            first = await client.request_workers("p", 1, reason="a big fan-out")
            second = await client.request_workers("p", 1)
            unknown = await client.request_workers("nope", 1)
            await until(lambda: _registered(client, 2), "two registered workers", timeout=30)
    assert (first.granted, first.reason) == (1, "granted")
    assert second.granted == 0 and "max 2" in second.reason
    assert unknown.granted == 0 and "no pool 'nope'" in unknown.reason


async def _registered(client: agentbus.Client, n: int) -> bool:
    workers = await client.workers()
    return len(workers) == n and all(w.pool == "p" and w.heartbeat_ts for w in workers)


def test_a_bad_pools_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('[pools.a]\nmodel = "scripted:x"\nmin = 3\nmax = 1\n')
    with pytest.raises(UsageError, match="min <= max"):
        load_pools(path)
    path.write_text("[pools.a]\nmin = 1\n")
    with pytest.raises(UsageError, match="model"):
        load_pools(path)


def test_the_readme_example_pools_file_loads() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert block, "README has a pools file example"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pools-{os.getpid()}.toml"
    path.write_text(block.group(1))
    try:
        fleet = load_pools(path)
    finally:
        path.unlink()
    assert fleet.pools["coder"].budget.max_usd == 2.0


@pytest.mark.timeout(120)
async def test_agentbus_up_with_no_api_key_completes_a_task_and_stops_everything_on_ctrl_c(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    store = tmp_path / ".agentbus" / "nats"
    up = subprocess.Popen(  # noqa: ASYNC220 - its output is read in a thread below
        [sys.executable, "-m", "agentbus.cli", "up", "--port", "0", "--store-dir", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert up.stdout is not None
        url = creds = None
        while url is None or creds is None:  # what it tells a person to export in another terminal
            line = (await asyncio.to_thread(up.stdout.readline)).decode()
            assert line, "agentbus up exited early:\n" + "".join(lines)
            lines.append(line)
            if m := re.search(r"export AGENTBUS_NATS_URL=(\S+)", line):
                url = m.group(1)
            if m := re.search(r"export AGENTBUS_CREDS=(\S+)", line):
                creds = m.group(1)
        assert any("offline scripted model" in x for x in lines)
        async with agentbus.connect(url, settings=agentbus.Settings(creds=creds)) as client:
            sid = await client.submit("write a haiku about queues", pool="general")
            state = await client.wait(sid, timeout=60)
        assert state.status == "completed"
        up.send_signal(signal.SIGINT)
        rest = (await asyncio.to_thread(up.communicate, timeout=60))[0].decode()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, rest
    assert "stopped" in rest
    leftovers = subprocess.run(  # noqa: ASYNC221
        ["pgrep", "-f", str(store)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""  # nats-server and every service exited


@pytest.mark.timeout(150)
def test_the_demo_delegates_fails_a_check_revises_and_completes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "agentbus.demo"], capture_output=True, text=True, timeout=140,
        env={**env, "TMPDIR": str(tmp_path)}, check=False,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "delegation_completed" in out and "Waiting in Line" in out
    assert "round 1: needs_revision" in out and "round 2: satisfied" in out
    assert "session completed after 2 rounds" in out
    assert "everything stopped (agentbus up exited 0)" in out
    # what used to look odd: a wait with nothing said, a dangling "Output:", twin status lines
    assert "waiting for the supervisor to start the first agent of pool general" in out
    assert "It printed nothing." in out and not any(x.endswith("Output:") for x in out.splitlines())
    assert "evaluating (round 1 result handed to the evaluator)" in out and "evaluating (grading round 1)" in out
    assert "up        | stopped" in out  # what `up` says while it stops is shown, not swallowed
    assert list(tmp_path.iterdir()) == []  # agentbus-demo-* and agentbus-up-* are removed


def test_pools_file_strings_take_environment_variables_with_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(
        '[pools.a]\nmodel = "${T_MODEL:-scripted:demo}"\nimage = "agentbus:${T_TAG}"\n'
        'volumes = ["${T_VOL:-work}:/work"]\n'
    )
    monkeypatch.setenv("T_TAG", "1.2")
    monkeypatch.delenv("T_MODEL", raising=False)
    spec = load_pools(path).pools["a"]
    assert (spec.model, spec.image, spec.volumes) == ("scripted:demo", "agentbus:1.2", ("work:/work",))
    monkeypatch.delenv("T_TAG")
    with pytest.raises(UsageError, match=r"\$\{T_TAG\} is not set"):
        load_pools(path)


@pytest.mark.timeout(120)
async def test_a_restarted_supervisor_adopts_the_process_workers_its_predecessor_left(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text('[pools.p]\nmodel = "scripted:demo"\nmin = 1\nmax = 1\n')
    cmd = [sys.executable, "-m", "agentbus.cli", "supervisor", "--pools", str(pools),
           "--nats", settings.nats_url, "--prefix", settings.prefix,
           "--log-dir", str(tmp_path / "logs"), "--workdir", str(tmp_path / "w")]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        [orphan] = await until(lambda: _registered_workers(client, 1), "the first supervisor's worker", timeout=60)
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no drain; its worker keeps running, now init's child
        first.wait()

    spawner = ProcessSpawner(settings, tmp_path / "logs", tmp_path / "w")
    async with supervising(settings, load_pools(pools), spawner, tick_s=0.1) as sup:
        await until(lambda: _size(sup, 1), "adoption", timeout=10)
        await ticks_pass(sup, 10)  # an adopted worker must not be doubled
        adopted = [(w.worker_id, getattr(w, "pid", None)) for w in sup.pools["p"].workers]
        sid = await client.submit("still served", pool="p")
        state = await client.wait(sid, timeout=60)
    assert adopted == [(orphan.worker_id, orphan.pid)]
    assert state.status == "completed" and state.owner == orphan.worker_id
    with pytest.raises(ProcessLookupError):  # the adoptee was drained with the rest
        for _ in range(100):
            os.kill(orphan.pid, 0)
            await asyncio.sleep(0.1)


async def _registered_workers(client: agentbus.Client, n: int) -> list[Any] | None:
    workers = await client.workers()
    return workers if len(workers) == n else None


async def test_a_task_held_by_a_worker_that_died_gets_a_new_worker_in_a_pool_with_min_0(
    client: agentbus.Client, settings: Settings
) -> None:
    from tests.helpers import PaperSpawner

    spec = client.bus.ns.pool_consumer("orphan", ack_wait_s=1)
    await client.submit("held by the dead", pool="orphan")
    puller = await client.bus.pull(spec)
    try:
        assert await puller.fetch(1)  # taken, never acked: what a worker killed mid-task leaves
        fleet = Fleet({"orphan": PoolSpec(name="orphan", model="scripted:demo", min=0, max=1, ack_wait_s=1)})
        async with supervising(settings, fleet, PaperSpawner()) as sup:

            async def started() -> bool:
                return sup.started >= 1

            await until(started, "a worker for the task nobody alive holds", timeout=15)
            await ticks_pass(sup, 3)
            assert sup.started == 1  # the one it started counts against the task: no second
    finally:
        await puller.close()


def _supervisor_start_lines(settings: Settings, tmp_path: Path, agent_creds: str) -> str:
    """What `agentbus supervisor` logs up to managing its pools (a pool of none: no worker starts)."""
    pools = tmp_path / "pools.toml"
    pools.write_text('[pools.p]\nmodel = "scripted:demo"\nmin = 0\nmax = 1\n')
    env = {**os.environ, "AGENTBUS_CREDS": settings.creds or "", "AGENTBUS_AGENT_CREDS": agent_creds}
    cmd = [sys.executable, "-m", "agentbus.cli", "supervisor", "--pools", str(pools),
           "--nats", settings.nats_url, "--prefix", settings.prefix,
           "--log-dir", str(tmp_path / "logs"), "--workdir", str(tmp_path / "w")]  # fmt: skip
    lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "supervisor managing" in line:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    return "".join(lines)


def test_a_supervisor_whose_workers_would_get_its_own_service_credentials_warns_and_names_the_fix(
    as_user: Any, tmp_path: Path
) -> None:
    service = as_user("sup", "service")
    out = _supervisor_start_lines(service, tmp_path, "")
    assert "supervisor managing p" in out, out
    assert "WARNING no --agent-creds: the workers get this supervisor's own credentials (role service)" in out
    assert "--role agent" in out

    agent = as_user("wk", "agent", pools=["p"])
    out = _supervisor_start_lines(service, tmp_path, agent.creds or "")
    assert "supervisor managing p" in out, out
    assert "agent-creds" not in out
