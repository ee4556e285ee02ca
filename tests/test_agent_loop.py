"""The agent's tool-use loop through the real anthropic SDK against the fake Messages API, on a real bus."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    InputRejected,
    ModelResponded,
    Record,
    ToolCallCompleted,
    ToolCallStarted,
    event_type,
)
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.agent.worker import AgentConfig, AgentWorker

Responder = Callable[[dict[str, Any]], dict[str, Any]]


@asynccontextmanager
async def agent(
    settings: Settings, tmp_path: Path, *, responder: Responder | None = None, **config: Any
) -> AsyncIterator[tuple[FakeMessagesAPI, AgentWorker]]:
    with FakeMessagesAPI(responder=responder) as api:
        model = AnthropicModel("claude-sonnet-4-6", api_key="test", base_url=api.base_url, max_retries=3)
        bus = await Bus.connect(settings)
        worker = AgentWorker(bus, AgentConfig(pool="p", model=model.name, workdir=tmp_path, **config), model)
        runner = asyncio.create_task(worker.run())
        try:
            yield api, worker
        finally:
            await worker.shutdown()
            await runner
            await model.aclose()
            await bus.close()


async def until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def kinds(records: list[Record]) -> list[str]:
    return [event_type(r.event) for r in records]


def last_user_text(request: dict[str, Any]) -> str:
    return json.dumps(request["messages"][-1])


async def test_a_multi_step_tool_session_completes_with_every_step_logged_once(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    usage = {"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 50, "cache_read_input_tokens": 7}
    async with agent(settings, tmp_path) as (api, _):
        api.script(
            [
                tool_use_response("write_file", {"path": "a.txt", "content": "hello"}, id="tu_1", usage=usage),
                tool_use_response("read_file", {"path": "a.txt"}, id="tu_2", usage=usage),
                text_response("the file says hello", usage=usage),
            ]
        )
        sid = await client.submit("write and read a file", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    assert state.result == "the file says hello"
    records = await client.show(sid)
    steps = [r.event for r in records if isinstance(r.event, ModelResponded)]
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.usage.cache_creation_input_tokens == 50 and s.usage.cache_read_input_tokens == 7 for s in steps)
    assert kinds(records).count("tool_call_started") == 2
    assert [r.event.output for r in records if isinstance(r.event, ToolCallCompleted)] == [
        "wrote 5 bytes to a.txt",
        "hello",
    ]
    assert state.usage.total == 3 * 177
    assert len(api.requests) == 3
    second = api.requests[1][0]
    assert second["messages"][-1]["content"][0] == {"type": "tool_result", "tool_use_id": "tu_1", **_content(second)}


def _content(request: dict[str, Any]) -> dict[str, Any]:
    block = request["messages"][-1]["content"][0]
    return {k: v for k, v in block.items() if k not in ("type", "tool_use_id")}


async def test_429_and_529_are_retried_by_the_sdk_and_the_session_completes(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent(settings, tmp_path) as (api, _):
        api.fail(429, retry_after=0.01)
        api.fail(529, retry_after=0.01)
        api.script([text_response("fine")])
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed" and state.result == "fine"
    assert len(api.requests) == 3
    assert kinds(await client.show(sid)).count("model_responded") == 1


async def test_a_400_ends_the_session_failed_with_the_apis_message(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent(settings, tmp_path) as (api, _):
        api.fail(400, message="messages: roles must alternate")
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "failed"
    assert "roles must alternate" in state.reason
    assert len(api.requests) == 1


async def test_say_mid_session_reaches_the_model_in_the_next_request(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    first_seen, said = threading.Event(), threading.Event()

    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if len(request["messages"]) == 1:
            first_seen.set()
            said.wait(10)
            return tool_use_response("write_file", {"path": "c.txt", "content": "red"})
        return text_response("ok")

    async with agent(settings, tmp_path, responder=responder) as (api, _):
        sid = await client.submit("pick a colour", pool="p")
        await asyncio.to_thread(first_seen.wait, 10)
        await client.say(sid, "use blue", author="ann")
        said.set()
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    second = last_user_text(api.requests[1][0])
    assert "[message from ann] use blue" in second
    assert second.index("tool_result") < second.index("use blue")  # tool results come first in the turn


async def test_ask_human_waits_for_a_reply_and_resumes_with_it(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if len(request["messages"]) == 1:
            return tool_use_response("ask_human", {"question": "which number?"}, id="tu_q")
        return text_response("you said " + last_user_text(request))

    async with agent(settings, tmp_path, responder=responder) as (api, _):
        sid = await client.submit("ask me", pool="p")
        await until(lambda: _status_is(client, sid, "waiting"))
        assert len(api.requests) == 1
        await client.say(sid, "42", author="bob")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    reply = api.requests[1][0]["messages"][-1]["content"]
    assert reply[0]["type"] == "tool_result" and reply[0]["tool_use_id"] == "tu_q"
    assert "42" in reply[0]["content"]
    assert len(reply) == 1  # the answer is the tool result, not also a separate message
    assert "status_changed" in kinds(await client.show(sid))


async def _status_is(client: agentbus.Client, sid: str, status: str) -> bool:
    return (await client.state(sid)).status == status


async def test_cancel_stops_a_waiting_session_as_cancelled(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        return tool_use_response("ask_human", {"question": "?"})

    async with agent(settings, tmp_path, responder=responder) as (api, _):
        sid = await client.submit("x", pool="p")
        await until(lambda: _status_is(client, sid, "waiting"))
        await client.cancel(sid, reason="changed my mind")
        state = await client.wait(sid, timeout=20)
    assert state.status == "cancelled"
    assert "changed my mind" in state.reason
    assert len(api.requests) == 1


async def test_a_malformed_task_is_recorded_and_terminated_and_the_agent_keeps_serving(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    victim = await client.submit("an existing session", pool="elsewhere")
    work = client.bus.ns.work("p")
    await client.bus.publish(work, b"\xffnot json", msg_id="bad-1")
    await client.bus.publish(work, json.dumps({"session_id": victim, "reason": 5}).encode(), msg_id="bad-2")
    async with agent(settings, tmp_path) as (api, _):
        api.script([text_response("served")])
        sid = await client.submit("a good one", pool="p")
        state = await client.wait(sid, timeout=20)
        rejected = await until(
            lambda: _events(client, victim, InputRejected),
        )
    assert state.status == "completed"
    assert "malformed work item" in rejected[0].reason
    pending = await (await client.bus.pull(client.bus.ns.pool_consumer("p"))).pending()
    assert pending == 0  # garbage was terminated, not left to be redelivered


async def _events(client: agentbus.Client, sid: str, kind: type) -> list[Any]:
    return [r.event for r in await client.show(sid) if isinstance(r.event, kind)]


async def test_delegation_runs_a_child_session_and_returns_its_result_to_the_parent(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        first = json.dumps(request["messages"][0])
        if "CHILD TASK" in first:
            return text_response("child says 7")
        if len(request["messages"]) == 1:
            return tool_use_response("delegate", {"prompt": "CHILD TASK: compute", "pool": "p"}, id="tu_d")
        return text_response("parent got: " + last_user_text(request))

    async with agent(settings, tmp_path, responder=responder, concurrency=2) as (_, _w):
        sid = await client.submit("parent task", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    assert "child says 7" in state.result
    assert len(state.children) == 1
    child = await client.state(state.children[0])
    assert (child.parent_session, child.depth, child.status) == (sid, 1, "completed")
    assert kinds(await client.show(sid)).count("delegation_completed") == 1


async def test_delegation_past_the_depth_limit_is_an_error_for_the_model_not_a_hang(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if len(request["messages"]) == 1:
            return tool_use_response("delegate", {"prompt": "sub"}, id="tu_d")
        return text_response("gave up on delegating")

    async with agent(settings, tmp_path, responder=responder, max_depth=0) as (api, _):
        sid = await client.submit("parent", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    result = api.requests[1][0]["messages"][-1]["content"][0]
    assert result["is_error"] is True and "depth limit" in result["content"]
    assert state.children == ()


async def test_a_tool_that_fails_becomes_an_error_result_and_the_loop_goes_on(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent(settings, tmp_path) as (api, _):
        api.script(
            [
                tool_use_response("read_file", {"path": "../../etc/passwd"}, id="tu_1"),
                tool_use_response("no_such_tool", {}, id="tu_2"),
                text_response("done"),
            ]
        )
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    errors = [r.event for r in await client.show(sid) if isinstance(r.event, ToolCallCompleted)]
    assert [e.is_error for e in errors] == [True, True]
    assert "outside the session workspace" in errors[0].output
    assert "unknown tool" in errors[1].output
    started = [r.event for r in await client.show(sid) if isinstance(r.event, ToolCallStarted)]
    assert not any(s.rerun for s in started)


async def test_a_draining_agent_finishes_its_step_and_hands_the_session_to_another(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    in_call, release = threading.Event(), threading.Event()

    def responder(request: dict[str, Any]) -> dict[str, Any]:
        turns = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if turns == 0:
            in_call.set()
            release.wait(10)
            return tool_use_response("write_file", {"path": "f.txt", "content": "x"}, id="tu_1")
        return text_response("finished by the second agent")

    async with agent(settings, tmp_path, responder=responder) as (api, first):
        sid = await client.submit("x", pool="p")
        await asyncio.to_thread(in_call.wait, 10)
        draining = asyncio.create_task(first.shutdown())
        release.set()
        await draining  # returns only after the in-flight step is recorded and the task released
        records = await client.show(sid)
        assert kinds(records).count("model_responded") == 1
        assert kinds(records).count("session_ended") == 0
        async with agent(settings, tmp_path, responder=responder) as (api2, _second):
            state = await client.wait(sid, timeout=20)
    assert state.status == "completed" and state.result == "finished by the second agent"
    records = await client.show(sid)
    assert [r.event.step for r in records if isinstance(r.event, ModelResponded)] == [1, 2]
    assert kinds(records).count("tool_call_completed") == 1
    assert len(api.requests) == 1 and len(api2.requests) == 1
