"""The loop survives failing tools (the other loop tests live in test_agent.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    ToolCallCompleted,
    ToolCallStarted,
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
