"""The loop survives failing tools (the other loop tests live in test_agent.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus import queues
from agentbus.config import Settings
from agentbus.messages import (
    ToolCallCompleted,
    ToolCallStarted,
)
from agentbus.subjects import ConsumerSpec
from agentbus.testing import text_response, tool_use_response
from tests.helpers import agent_with_fake, until

Responder = Callable[[dict[str, Any]], dict[str, Any]]


async def test_a_tool_that_fails_becomes_an_error_result_and_the_loop_goes_on(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path) as (api, _):
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


async def test_a_tool_call_cut_off_by_max_tokens_is_not_run(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    cut = tool_use_response("write_file", {"path": "half.txt", "content": "trunc"}, id="tu_cut")
    cut["stop_reason"] = "max_tokens"
    async with agent_with_fake(settings, tmp_path) as (api, _):
        api.script([cut, text_response("ok, stopping")])
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    result = api.requests[1][0]["messages"][-1]["content"][0]
    assert result["is_error"] is True and "output token limit" in result["content"]
    assert not list(tmp_path.glob("*/half.txt"))  # noqa: ASYNC240


async def test_an_unexpected_stop_reason_ends_the_session_instead_of_calling_again(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    odd = text_response("stopped early")
    odd["stop_reason"] = "model_context_window_exceeded"
    async with agent_with_fake(settings, tmp_path) as (api, _):
        api.script([odd])
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=20)
    assert state.status == "failed" and "model_context_window_exceeded" in state.reason
    assert len(api.requests) == 1


async def test_a_work_item_for_an_unknown_session_is_dropped_without_inventing_one(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an item may overtake its session's first event, so it waits for it (the work streams' dedup
    # window and a margin: tests/test_submit_order.py) before it is dropped; 2 s here
    monkeypatch.setattr(queues, "UNSEEN_MARGIN_S", 2.0 - client.queues.unseen_hold_s() + queues.UNSEEN_MARGIN_S)
    await client.bus.publish(client.bus.ns.work("p"), b'{"session_id": "ghost123"}', msg_id="ghost")
    async with agent_with_fake(settings, tmp_path) as (api, _):
        api.script([text_response("served")])
        sid = await client.submit("real", pool="p")
        assert (await client.wait(sid, timeout=20)).status == "completed"
        backlog = client.bus.ns.pool_consumer("p")
        await until(lambda: _is_empty(client, backlog), "the ghost item to be dropped", timeout=30)
    assert "ghost123" not in await client.log.session_ids()
    assert await client.bus.consumer_backlog(client.bus.ns.pool_consumer("p")) == (0, 0)


async def _is_empty(client: agentbus.Client, spec: ConsumerSpec) -> bool:
    return await client.bus.consumer_backlog(spec) == (0, 0)
