"""`kill -9` of an agent mid-session: another agent resumes from the log, repeating nothing recorded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.messages import ModelResponded, SessionClaimed, ToolCallCompleted, ToolCallStarted, event_type
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def _agent(settings: Settings, api: FakeMessagesAPI, workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    """The real `agentbus agent` command in its own process; its output goes to `log`."""
    cmd = [
        sys.executable, "-m", "agentbus.cli", "agent", "--pool", "p", "--model", "anthropic:claude-sonnet-4-6",
        "--tools", "read_file,write_file,bash", "--workdir", str(workdir), "--ack-wait", "2",
        "--nats", settings.nats_url, "--prefix", settings.prefix,
    ]  # fmt: skip
    env = {**os.environ, "ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test"}
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


async def _until(check: Any, timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await check()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
    return value


@pytest.mark.timeout(90)
async def test_a_second_agent_resumes_a_killed_one_without_repeating_a_recorded_step(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    gate = threading.Event()
    second_request_seen = threading.Event()

    def responder(request: dict[str, Any]) -> dict[str, Any]:
        turns = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if turns == 0:
            return tool_use_response("bash", {"command": "echo once >> side.txt"}, id="tu_side")
        if turns == 1:
            second_request_seen.set()
            gate.wait(30)  # the first agent dies in here: after the tool result, before the next response
            return tool_use_response("read_file", {"path": "side.txt"}, id="tu_read")
        return text_response("side.txt has one line")

    workdir = tmp_path / "work"
    with FakeMessagesAPI(responder=responder) as api:
        procs.append(_agent(settings, api, workdir, tmp_path / "agent1.log"))
        sid = await client.submit("append once, then check", pool="p")

        async def tool_done() -> bool:
            return any(isinstance(r.event, ToolCallCompleted) for r in await client.show(sid))

        await _until(tool_done)
        await asyncio.to_thread(second_request_seen.wait, 30)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        gate.set()  # the dead agent's request is answered into a closed socket

        procs.append(_agent(settings, api, workdir, tmp_path / "agent2.log"))
        state = await client.wait(sid, timeout=45)
        requests = [body for body, _ in api.requests]

    assert state.status == "completed", state.reason
    assert state.result == "side.txt has one line"
    records = await client.show(sid)
    steps = [r.event.step for r in records if isinstance(r.event, ModelResponded)]
    assert steps == [1, 2, 3]  # each step once
    assert [r.event.tool_use_id for r in records if isinstance(r.event, ToolCallCompleted)] == ["tu_side", "tu_read"]
    assert not any(r.event.rerun for r in records if isinstance(r.event, ToolCallStarted))
    claims = [r.event for r in records if isinstance(r.event, SessionClaimed)]
    assert len({c.worker for c in claims}) == 2  # two different agents worked on it
    first_step_requests = [r for r in requests if not any(m["role"] == "assistant" for m in r["messages"])]
    assert len(first_step_requests) == 1  # the recorded step 1 was never requested again
    side = next(workdir.glob("*/side.txt")).read_text()
    assert side == "once\n"  # the tool's side effect happened once
    assert [event_type(r.event) for r in records].count("session_ended") == 1
    assert json.dumps(requests[-1]).count("tu_side") >= 2  # resumed conversation carries the recorded call
