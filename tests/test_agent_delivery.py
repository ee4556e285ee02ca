"""A task is never silently dropped: exhausted deliveries end the session `failed` with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI
from services.agent.worker import AgentConfig, AgentWorker


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await Bus.connect(settings)
    try:
        yield b
    finally:
        await b.close()


async def _settled(client: agentbus.Client, sid: str, timeout: float = 30.0) -> agentbus.SessionState:
    return await client.wait(sid, timeout=timeout)


async def test_a_task_that_fails_on_every_delivery_ends_failed_with_the_reason(
    client: agentbus.Client, bus: Bus, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.fail(500, times=10, message="backend on fire")
        model = AnthropicModel("claude-sonnet-4-6", api_key="test", base_url=api.base_url, max_retries=0)
        worker = AgentWorker(bus, AgentConfig(pool="p", model=model.name, workdir=tmp_path, max_deliver=2), model)
        runner = asyncio.create_task(worker.run())
        try:
            sid = await client.submit("do it", pool="p")
            state = await _settled(client, sid)
        finally:
            await worker.shutdown()
            await runner
            await model.aclose()
        assert state.status == "failed"
        assert "gave up after 2 attempts" in state.reason
        assert "backend on fire" in state.reason
        assert len(api.requests) == 2  # one model call per delivery, none after giving up
        pending = await (await bus.pull(bus.ns.pool_consumer("p", max_deliver=2))).pending()
        assert pending == 0  # terminated, not left to haunt the queue


async def test_a_task_whose_last_delivery_dies_unacked_is_failed_from_the_advisory(
    client: agentbus.Client, bus: Bus, tmp_path: Path
) -> None:
    """The agent holding the last delivery vanished: nobody acks, JetStream only announces it."""
    spec = bus.ns.pool_consumer("q", ack_wait_s=1.0, max_deliver=1)
    with FakeMessagesAPI() as api:
        model = AnthropicModel("claude-sonnet-4-6", api_key="test", base_url=api.base_url, max_retries=0)
        worker = AgentWorker(
            bus, AgentConfig(pool="q", model=model.name, workdir=tmp_path, max_deliver=1, ack_wait_s=1.0), model
        )
        # A "dead agent": take the one delivery and never settle it.
        puller = await bus.pull(spec)
        sid = await client.submit("do it", pool="q")
        jobs = await puller.fetch(1, timeout=5.0)
        assert len(jobs) == 1
        await puller.close()
        runner = asyncio.create_task(worker.run())
        try:
            state = await _settled(client, sid)
        finally:
            await worker.shutdown()
            await runner
            await model.aclose()
        assert state.status == "failed"
        assert "max_deliver" in state.reason
        assert api.requests == []
