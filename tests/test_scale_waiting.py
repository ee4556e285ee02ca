"""Scale: thousands of sessions waiting for a person at once cost the server no consumer each.

A session that waits for a person (`ask_human`) is parked: its work-queue message is acked, it
holds no agent slot and no consumer; the answer queues it again through the agents' shared `wake`
durable. So N sessions waiting at once, then all answered, must all complete, while the number
of consumers the server holds for the namespace stays what one agent and one client hold,
whatever N is.

Real nats-server, one in-process agent with many slots, and the package's scripted model (the
`scripted:` backend, in process; the real SDK against the fake Messages API doubles the time, and
this test is about the bus, not the SDK), wrapped to record what each call was sent. N is
`AGENTBUS_SCALE_WAITING`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.models import ModelReply, ScriptedModel
from agentbus.state import SessionState
from services.agent.worker import AgentConfig, AgentWorker
from tests.helpers import POOL, raw_connect, until

N = int(os.environ.get("AGENTBUS_SCALE_WAITING", "5000"))
CHUNK = 100  # submissions (and answers) in flight at once
SLOTS = 64  # the agent's concurrency
# What one agent and one client hold, with room to spare: the agent's durables (its pool's work
# queue, wake, wake-control, timers, exhausted) plus short-lived readers. Parked sessions add none.
MAX_CONSUMERS = 20

T = TypeVar("T")

SCRIPT = {
    "responses": [
        {
            "content": [{"type": "tool_use", "id": "toolu_q", "name": "ask_human", "input": {"question": "colour?"}}],
            "stop_reason": "tool_use",
        },
        {"content": [{"type": "text", "text": "thanks"}], "stop_reason": "end_turn"},
    ]
}


class RecordingModel(ScriptedModel):
    """The scripted model, also keeping the tool result each session's second call carried."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls = 0
        self.answers: dict[str, str] = {}

    async def respond(self, *, session_id: str, messages: list[dict[str, Any]], **rest: Any) -> ModelReply:
        self.calls += 1
        if any(m.get("role") == "assistant" for m in messages):
            self.answers[session_id] = _tool_result(messages[-1])
        return await super().respond(session_id=session_id, messages=messages, **rest)


def _tool_result(message: dict[str, Any]) -> str:
    for block in message["content"]:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content", "")
            if isinstance(content, str):
                return content
            return "".join(b.get("text", "") for b in content if b.get("type") == "text")
    return "(no tool result)"


@contextlib.asynccontextmanager
async def _agent(settings: Settings, model: ScriptedModel, workdir: Path) -> AsyncIterator[AgentWorker]:
    """An in-process agent with SLOTS slots on its own connection; drained on exit."""
    bus = await Bus.connect(settings, name="scale-agent")
    worker = AgentWorker(bus, AgentConfig(pool=POOL, model=model.name, workdir=workdir, concurrency=SLOTS), model)
    runner = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        await worker.shutdown()
        await runner
        await bus.close()


async def _in_chunks(items: Sequence[T], call: Callable[[T], Awaitable[Any]]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(items), CHUNK):
        out += await asyncio.gather(*(call(item) for item in items[start : start + CHUNK]))
    return out


async def _consumers(nc: Any, settings: Settings) -> int:
    """Consumers the server holds on this namespace's streams (its KV buckets included)."""
    upper = settings.prefix.upper()
    streams = await nc.jetstream().streams_info()
    return sum(int(s.state.consumer_count) for s in streams if s.config.name.startswith((f"{upper}_", f"KV_{upper}_")))


@contextlib.asynccontextmanager
async def _sampling(settings: Settings, counts: list[int]) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Sample the namespace's consumer count twice a second into `counts` while the block runs;
    yields a function that takes one sample now."""
    nc = await raw_connect(settings)

    async def sample() -> int:
        counts.append(await _consumers(nc, settings))
        return counts[-1]

    async def loop() -> None:
        while True:
            await sample()
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(loop())
    try:
        yield sample
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await nc.close()


def _parked_for_answer(s: SessionState) -> bool:
    return s.status == "waiting" and s.parked and s.waiting_for == "answer"


def _completed(s: SessionState) -> bool:
    return s.status == "completed"


def _summary(states: Sequence[SessionState]) -> str:
    by: dict[str, int] = {}
    for s in states:
        key = f"{s.status}/{s.reason or s.waiting_for or '-'}"
        by[key] = by.get(key, 0) + 1
    odd = [s for s in states if s.status not in ("waiting", "completed")][:3]
    return f"{len(states)} sessions by status: {by}; e.g. {odd}"


@pytest.mark.timeout(300)
async def test_thousands_of_sessions_wait_for_a_person_without_a_consumer_each_and_all_finish_once_answered(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    script = tmp_path / "ask.json"
    script.write_text(json.dumps(SCRIPT))
    model = RecordingModel(script)
    counts: list[int] = []
    marks: dict[str, float] = {}
    started = time.monotonic()

    async def idle() -> bool:
        """Nothing left to do: no answer waiting to wake its session, no queued or unacked task,
        no session on the agent. (A wake queues the task before it acks, so there is no gap.)"""
        await asyncio.sleep(0.2)
        ns = client.bus.ns
        backlogs = [await client.bus.consumer_backlog(c) for c in (ns.wake_consumer(), ns.pool_consumer(POOL))]
        return not worker.sessions and all(b == (0, 0) for b in backlogs)

    async def serving() -> bool:
        """The agent's pool queue and the shared wake durable exist (before that, `idle` would
        find no backlog on them and say yes)."""
        ns = client.bus.ns
        streams = (ns.work_stream, ns.sessions_stream)
        have = {c.name for stream in streams for c in await client.bus.consumer_states(stream)}
        return {ns.pool_consumer(POOL).durable, ns.wake_consumer().durable} <= have

    def mark(what: str) -> None:
        marks[what] = time.monotonic() - started

    async with _agent(settings, model, tmp_path) as worker, _sampling(settings, counts) as sample:
        await until(serving, "the agent to serve")
        sids: list[str] = await _in_chunks(range(N), lambda i: client.submit(f"task {i}", pool=POOL))
        mark("submitted")
        await until(idle, f"{N} sessions to ask and park", timeout=120)
        mark("all waiting")
        while_waiting = [await sample() for _ in range(3)]
        assert model.calls == N
        wanted = set(sids)
        waiting = [s for s in await client.sessions() if s.session_id in wanted]
        assert len(waiting) == N and all(_parked_for_answer(s) for s in waiting), _summary(waiting)
        mark("listed")

        await _in_chunks(list(enumerate(sids)), lambda p: client.say(p[1], f"colour {p[0]}"))
        mark("answered")
        await until(idle, f"{N} answered sessions to run", timeout=150)
        mark("all ran")
        states = [s for s in await client.sessions() if s.session_id in wanted]
        mark("listed again")
        after = await sample()

    print(f"N={N}: " + ", ".join(f"{k} at {v:.1f}s" for k, v in marks.items()))  # figures, not checks
    print(f"consumers: while waiting {while_waiting}, after {after}, peak {max(counts)} of {len(counts)} samples")
    assert max(counts) <= MAX_CONSUMERS, f"the server held up to {max(counts)} consumers with {N} sessions"
    assert len(states) == N and all(_completed(s) for s in states), _summary(states)
    # the model read each person's own answer (as `[message from <user>] <text>`), and nothing ran twice
    assert all(model.answers.get(sid, "").endswith(f"] colour {i}") for i, sid in enumerate(sids))
    assert model.calls == 2 * N
