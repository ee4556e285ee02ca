"""Every bad input from any language gets a recorded answer: an `input_rejected` in its session, saying why."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.messages import InputRejected, InvalidEvent, SessionClaimed, UnknownEvent
from agentbus.testing import FakeMessagesAPI, text_response
from tests.helpers import POOL, agent, until

NOW = 1767225600.5


@pytest.fixture
async def agent_running(settings: Settings, client: agentbus.Client, tmp_path: Path) -> AsyncIterator[None]:
    """An agent whose shared durables exist (they deliver only what arrives after they are made)."""
    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path):
            await until(lambda: _durables(client, {"wake", "wake-control"}), "the agent's durables", timeout=20)
            yield


async def _durables(client: agentbus.Client, names: set[str]) -> bool:
    return names <= {c.name for c in await client.bus.consumer_states(client.bus.ns.sessions_stream)}


async def _rejections(client: agentbus.Client, sid: str) -> list[InputRejected]:
    return [r.event for r in await client.show(sid) if isinstance(r.event, InputRejected)]


async def _publish(client: agentbus.Client, subject: str, payload: Any, msg_id: str) -> int:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return (await client.bus.publish(subject, data, msg_id=msg_id)).seq


INPUT_CASES = [
    ({"type": "human_message", "id": "h1", "ts": NOW, "text": "hi"}, "missing required field `author`"),
    ({"type": "human_mesage", "id": "h2", "ts": NOW, "text": "hi", "author": "a"}, "did you mean 'human_message'?"),
    ({"type": "human_message", "id": "h3", "ts": time.time() * 1000, "text": "hi", "author": "a"}, "not seconds"),
    ({"type": "session_ended", "id": "ended", "ts": NOW, "status": "completed"}, "where people may not write it"),
    (b"\xff not json", "not JSON"),
]


@pytest.mark.parametrize(("payload", "why"), INPUT_CASES, ids=["no-author", "misspelled", "millis", "forged", "bytes"])
async def test_bad_input_on_a_people_channel_is_answered_in_the_session(
    client: agentbus.Client, agent_running: None, payload: Any, why: str
) -> None:
    sid = await client.submit("hello", pool="elsewhere")  # nothing runs it: only the answer is written
    seq = await _publish(client, client.bus.ns.session_input(sid, client.bus.user), payload, f"{sid}:bad")

    (rejected,) = await until(lambda: _rejections(client, sid), "an input_rejected", timeout=20)

    assert rejected.id == f"input-rejected-{seq}"
    assert why in rejected.reason and rejected.reason.startswith(f"message #{seq}: ")
    assert rejected.source == client.bus.ns.session_input(sid, client.bus.user)
    shown = next(r for r in await client.show(sid) if r.seq == seq).event
    assert isinstance(shown, InvalidEvent | UnknownEvent)


async def test_a_bad_command_on_the_control_channel_is_answered_and_a_good_one_is_not(
    client: agentbus.Client, agent_running: None
) -> None:
    sid = await client.submit("hello", pool="elsewhere")
    subject = client.bus.ns.session_control(sid, client.bus.user)
    bad = {"type": "resume_requested", "id": "resume-x", "ts": NOW, "author": "a", "budget": {"max_steps": "ten"}}

    seq = await _publish(client, subject, bad, f"{sid}:resume-x")

    (rejected,) = await until(lambda: _rejections(client, sid), "an input_rejected", timeout=20)
    assert rejected.id == f"input-rejected-{seq}" and "$.budget.max_steps" in rejected.reason
    assert [r.event.id for r in await client.show(sid)][:2] == ["created", "routed"]  # the good ones stand


async def test_an_event_from_a_newer_version_is_passed_through_not_rejected(
    client: agentbus.Client, agent_running: None
) -> None:
    sid = await client.submit("hello", pool="elsewhere")
    subject = client.bus.ns.session_input(sid, client.bus.user)
    newer = {"type": "hologram_sent", "id": "holo-1", "ts": NOW, "v": 2, "frames": 3}
    newer_seq = await _publish(client, subject, newer, f"{sid}:holo-1")
    bad_seq = await _publish(client, subject, {"type": "human_mesage", "id": "h9", "ts": NOW}, f"{sid}:h9")

    await until(lambda: _rejections(client, sid), "the misspelled one's answer", timeout=20)
    await until(lambda: _handled(client, "wake", bad_seq), "the wake durable to pass both", timeout=20)

    assert [r.id for r in await _rejections(client, sid)] == [f"input-rejected-{bad_seq}"]
    assert newer_seq < bad_seq


async def _handled(client: agentbus.Client, durable: str, seq: int) -> bool:
    states = {c.name: c for c in await client.bus.consumer_states(client.bus.ns.sessions_stream)}
    state = states.get(durable)
    return state is not None and state.delivered_seq >= seq and state.in_flight == 0


async def test_input_to_a_session_nobody_created_writes_nothing(client: agentbus.Client, agent_running: None) -> None:
    subject = client.bus.ns.session_input("ghost", client.bus.user)

    seq = await _publish(client, subject, {"type": "human_mesage", "id": "x", "ts": NOW}, "ghost:x")
    await until(lambda: _handled(client, "wake", seq), "the wake durable to pass it", timeout=20)

    assert [r.seq for r in await client.show("ghost")] == [seq]


async def test_a_bad_record_on_a_sessions_log_is_answered_by_the_agent_that_takes_the_session(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    sid = await client.submit("hello", pool=POOL)
    seq = await _publish(client, client.bus.ns.session_log(sid), {"type": "tool_call_complete", "id": "t"},
                         f"{sid}:t")  # fmt: skip

    with FakeMessagesAPI(responder=lambda _request: text_response("done")) as api:
        async with agent(settings, api, tmp_path):
            await client.wait(sid, timeout=30)
            # a follow-up: a second run reads the same bad record
            again = await client.say(sid, "once more", queue=True)
            await until(lambda: _run_count(client, sid, 2), "a second run")
            await client.wait(sid, timeout=30)
    (rejected,) = await _rejections(client, sid)
    assert rejected.id == f"input-rejected-{seq}" and again > seq
    assert "unknown event type 'tool_call_complete' (v1); did you mean 'tool_call_completed'?" in rejected.reason


async def _run_count(client: agentbus.Client, sid: str, count: int) -> bool:
    return sum(isinstance(r.event, SessionClaimed) for r in await client.show(sid)) >= count
