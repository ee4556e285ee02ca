"""Chaos: agents killed with SIGKILL at random moments while sessions run tools with side effects.

A history checker reads every session's log and workspace afterwards: every session completed, no
model step was recorded twice, no tool call was started twice (bash is not `repeatable`: a call
cut off by a crash is answered as interrupted, never run again), and every side effect (a line a
bash call appends) happened at most once. Real parts: `agentbus agent` processes, bash in the
bubblewrap sandbox, the anthropic SDK against the fake Messages API, a real nats-server.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.messages import ModelResponded, SessionClaimed, ToolCallCompleted, ToolCallStarted
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.helpers import POOL
from tests.test_agent import agent_process, turns

SESSIONS = 12
KILLS = 6

# each call appends a line, waits, then appends another: a kill in between cuts a call in half
STEP = "echo {sid}-{n}-a >> side.txt; sleep 0.3; echo {sid}-{n}-b >> side.txt"


def responder(request: dict[str, Any]) -> dict[str, Any]:
    prompt = request["messages"][0]["content"]
    text = prompt if isinstance(prompt, str) else prompt[0]["text"]
    sid = re.search(r"chaos (\d+)", text).group(1)  # type: ignore[union-attr]
    n = turns(request)
    if n < 2:
        return tool_use_response("bash", {"command": STEP.format(sid=sid, n=n)}, id=f"tu_{sid}_{n}")
    return text_response(f"done {sid}")


async def _holder_of_a_running_call(
    client: agentbus.Client, sids: list[str], procs: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes] | None:
    """The live agent process (by the pid in its worker id) holding a session in a tool call."""
    live = {p.pid: p for p in procs if p.poll() is None}
    for _ in range(1500):
        ended = 0
        for sid in sids:
            records = await client.show(sid)
            if records and (await client.state(sid)).terminal:
                ended += 1
                continue
            started = {r.event.tool_use_id for r in records if isinstance(r.event, ToolCallStarted)}
            done = {r.event.tool_use_id for r in records if isinstance(r.event, ToolCallCompleted)}
            claims = [r.event.worker for r in records if isinstance(r.event, SessionClaimed)]
            pid = int(claims[-1].rsplit("-", 2)[-2]) if claims else 0
            if started - done and pid in live:
                return live[pid]
        if ended == len(sids):
            return None
        await asyncio.sleep(0.02)
    raise AssertionError("no session was ever in a tool call")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The agents this test starts; whatever is alive at the end is killed and reaped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.timeout(240)
async def test_agents_killed_at_random_never_lose_a_session_or_repeat_a_side_effect(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    rng = random.Random(20261130)  # the same schedule every run; the machine's speed varies it anyway
    with FakeMessagesAPI(responder=responder) as api:
        started = 0

        def start() -> None:
            nonlocal started
            started += 1
            procs.append(agent_process(settings, api, work, logs / f"agent{started}.log", ["--concurrency", "4"]))

        start()
        start()
        sids = {await client.submit(f"chaos {i}: append lines", pool=POOL): i for i in range(SESSIONS)}
        kills = 0
        for _ in range(KILLS):
            victim = await _holder_of_a_running_call(client, list(sids), procs)
            if victim is None:  # everything ended before the schedule did
                break
            await asyncio.sleep(rng.uniform(0, 0.35))  # before, between or after the call's two lines
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait, 10)
            kills += 1
            start()
        states = {sid: await client.wait(sid, timeout=120) for sid in sids}

    resumed = interrupted = doubled = 0
    for sid, i in sids.items():
        records = await client.show(sid)
        assert states[sid].status == "completed", (sid, states[sid].reason)
        assert states[sid].result == f"done {i}"
        steps = [r.event.step for r in records if isinstance(r.event, ModelResponded)]
        assert len(steps) == len(set(steps)), f"{sid}: a model step recorded twice: {steps}"
        calls = Counter(r.event.tool_use_id for r in records if isinstance(r.event, ToolCallStarted))
        assert calls and max(calls.values()) == 1, f"{sid}: a tool call started twice: {calls}"
        answers = [r.event for r in records if isinstance(r.event, ToolCallCompleted)]
        finished = {a.tool_use_id for a in answers}
        interrupted += sum(a.is_error and "interrupted" in a.output for a in answers)
        assert finished == set(calls), f"{sid}: every started call has one answer"
        lines = Counter((work / sid / "side.txt").read_text().splitlines())
        doubled += sum(n > 1 for n in lines.values())
        assert lines and max(lines.values()) == 1, f"{sid}: a side effect happened twice: {lines}"
        assert set(lines) <= {f"{i}-{n}-{half}" for n in (0, 1) for half in "ab"}
        resumed += len({r.event.worker for r in records if isinstance(r.event, SessionClaimed)}) > 1
    print(f"chaos: {SESSIONS} sessions, {kills} kills, {resumed} taken over, {doubled} side effects doubled, "
          f"{interrupted} calls interrupted and reported to the model")  # fmt: skip
    # the schedule must have cut into running sessions, or this test proves nothing
    assert resumed >= 1, "no session was taken over by another agent"
