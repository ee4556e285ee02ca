"""No black holes: `agentbus pools` shows who serves each pool, `submit` warns about a pool nothing
serves, and `submit --wait` says what it is waiting for."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

import agentbus
from agentbus.cli import main
from agentbus.client import PoolInfo
from agentbus.config import Settings
from agentbus.testing import text_response
from services.supervisor.pools import Fleet, PoolSpec
from tests.helpers import POOL, Gate, PaperSpawner, agent_with_fake, supervising, until


def _cli(settings: Settings, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--nats", settings.nats_url, "--prefix", settings.prefix])


async def _pool(client: agentbus.Client, name: str) -> PoolInfo | None:
    return next((p for p in await client.pools() if p.name == name), None)


async def test_a_pool_nothing_serves_is_listed_with_its_waiting_task_and_how_to_serve_it(
    client: agentbus.Client, settings: Settings
) -> None:
    await client.submit("into the void", pool="nobody")
    result = await asyncio.to_thread(_cli, settings, "pools", "--json")
    assert result.exit_code == 0
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (row["name"], row["waiting"], row["in_flight"], row["workers"], row["served"]) == (
        "nobody", 1, 0, [], False
    )  # fmt: skip
    assert row["oldest_waiting_s"] >= 0
    text = await asyncio.to_thread(_cli, settings, "pools")
    assert "nothing: agentbus agent --pool nobody --model" in text.stdout


async def test_pools_shows_live_agents_their_free_slots_and_tasks_in_flight_and_waiting(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: dict[str, Any]) -> dict[str, Any]:
        gate.hold()
        return text_response("done")

    async with agent_with_fake(settings, tmp_path, responder, concurrency=1, gates=(gate,)) as (_, worker):
        first = await client.submit("one", pool=POOL)
        await gate.wait_reached()
        await client.submit("two", pool=POOL)

        async def busy() -> PoolInfo | None:
            p = await _pool(client, POOL)
            return p if p and p.in_flight == 1 and p.waiting == 1 and p.free_slots == 0 else None

        pool = await until(busy, "the registry to show the agent busy", timeout=15)
        assert pool.workers == (worker.config.worker_id,) and pool.served
        assert pool.oldest_waiting_s is not None and pool.oldest_waiting_s >= 0
        gate.open()
        assert (await client.wait(first, timeout=30)).status == "completed"


async def test_a_supervisor_announces_the_pools_it_starts_workers_for_and_withdraws_when_it_stops(
    client: agentbus.Client, settings: Settings
) -> None:
    fleet = Fleet({
        "grow": PoolSpec(name="grow", model="scripted:demo", min=0, max=2),
        "fixed": PoolSpec(name="fixed", model="scripted:demo", min=0, max=0),  # served by others alone
    })  # fmt: skip
    async with supervising(settings, fleet, PaperSpawner()) as sup:
        announced = await until(client.supervisors, "the supervisor's announcement")
        assert [(s.supervisor_id, s.pools) for s in announced] == [(sup.supervisor_id, ("grow",))]
        assert await client.serves("grow") and not await client.serves("fixed")
        grow = await _pool(client, "grow")
        assert grow is not None and grow.supervisors == (sup.supervisor_id,) and grow.served
    assert await client.supervisors() == []


def test_submit_to_a_pool_nothing_serves_records_it_and_warns_in_one_line(settings: Settings) -> None:
    result = _cli(settings, "submit", "hello", "--pool", "nobody")
    assert result.exit_code == 0 and len(result.stdout.split()) == 1  # the session id, as always
    assert result.stderr.splitlines() == [
        "agentbus: warning: no agent or supervisor serves pool nobody; the task waits until one does "
        "(agentbus agent --pool nobody --model scripted:demo, or [pools.nobody] in a pools file for agentbus up)"
    ]


async def test_submit_to_a_pool_a_supervisor_serves_does_not_warn(client: agentbus.Client, settings: Settings) -> None:
    fleet = Fleet({"grow": PoolSpec(name="grow", model="scripted:demo", min=0, max=1)})
    async with supervising(settings, fleet, PaperSpawner()):
        await until(client.supervisors, "the supervisor's announcement")
        result = await asyncio.to_thread(_cli, settings, "submit", "hello", "--pool", "grow")
    assert result.exit_code == 0 and result.stderr == ""


def test_wait_on_an_unserved_pool_says_so_and_times_out_with_exit_5(settings: Settings) -> None:
    result = _cli(settings, "submit", "hello", "--pool", "nobody", "--wait", "--timeout", "3")
    assert result.exit_code == 5
    lines = result.stderr.splitlines()
    assert any(line.endswith(": queued on pool nobody; nothing serves it (agentbus agent --pool nobody --model ...)")
               for line in lines)  # fmt: skip
    assert lines[-1].endswith("still running after 3s")


async def test_wait_shows_each_status_on_its_own_line_when_not_on_a_terminal(
    settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path, lambda _: text_response("a haiku")):
        result = await asyncio.to_thread(_cli, settings, "submit", "hello", "--pool", POOL, "--wait")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    sid = result.stdout.split()[0]
    # only the status lines: the in-process agent's own warnings share this stderr
    statuses = [line.removeprefix(f"{sid}: ") for line in result.stderr.splitlines() if line.startswith(f"{sid}: ")]
    assert "running step 1 (0 tool calls so far, $0.0000)" in statuses  # claimed, before the reply
    assert statuses[-1] == "completed"
    # queued only if the agent had not claimed it by the first look
    assert all(s.startswith((f"queued on pool {POOL}", "running step 1 (", "completed")) for s in statuses)
    assert result.stdout.splitlines()[-1] == "a haiku"


def test_wait_on_a_terminal_rewrites_one_status_line(settings: Settings) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agentbus.cli", "submit", "hello", "--pool", "nobody", "--wait", "--timeout", "2",
             "--nats", settings.nats_url, "--prefix", settings.prefix],
            stdout=subprocess.PIPE, stderr=follower, timeout=60, check=False,
        )  # fmt: skip
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer is gone and the buffer is empty
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 5
    assert b"\r\x1b[K" in seen and b"queued on pool nobody" in seen


def test_ctrl_c_during_wait_is_one_line_and_exit_130_and_the_session_goes_on(settings: Settings) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentbus.cli", "submit", "hello", "--pool", "nobody", "--wait",
         "--nats", settings.nats_url, "--prefix", settings.prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = []
        while not any("queued on pool nobody" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "exited early: " + "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    last = rest.strip().splitlines()[-1]
    assert last.startswith("agentbus: interrupted; session ") and "goes on (agentbus tap " in last
    sid = last.split()[3]
    result = _cli(settings, "show", sid, "--json")
    assert json.loads(result.stdout)["state"]["status"] == "queued"


def test_a_pool_line_names_who_serves_it() -> None:
    from agentbus.render import pool_line

    one = pool_line(PoolInfo(name="p", workers=("w1",), free_slots=3, supervisors=("s1",)))
    assert one.split() == ["p", "1", "3", "0", "0", "-", "supervisor", "s1,", "1", "agent"]
    two = pool_line(PoolInfo(name="p", workers=("w1", "w2"), waiting=2, oldest_waiting_s=130.0))
    assert two.endswith("2m  2 agents")
