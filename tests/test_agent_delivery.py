"""A task is never silently dropped: exhausted deliveries end the session `failed` with the reason."""

from __future__ import annotations

from pathlib import Path

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.server import NatsServer
from agentbus.testing import FakeMessagesAPI
from tests.helpers import agent, raw_connect, until


async def test_a_task_that_fails_on_every_delivery_ends_failed_with_the_reason(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.fail(500, times=10, message="backend on fire")
        async with agent(settings, api, tmp_path, max_retries=0, max_deliver=2):
            sid = await client.submit("do it", pool="p")
            state = await client.wait(sid, timeout=30)
    assert state.status == "failed"
    assert "gave up after 2 attempts" in state.reason
    assert "backend on fire" in state.reason
    assert len(api.requests) == 2  # one model call per delivery, none after giving up
    assert await client.bus.consumer_backlog(client.bus.ns.pool_consumer("p")) == (0, 0)  # terminated


async def test_a_task_whose_last_delivery_dies_unacked_is_failed_from_the_advisory(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """The agent holding the last delivery vanished: nobody acks, JetStream only announces it."""
    bus = client.bus
    # A "dead agent": take the one delivery and never settle it.
    puller = await bus.pull(bus.ns.pool_consumer("p", ack_wait_s=1.0, max_deliver=1))
    sid = await client.submit("do it", pool="p")
    assert len(await puller.fetch(1, timeout=5.0)) == 1
    await puller.close()
    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path, max_deliver=1, ack_wait_s=1.0):
            state = await client.wait(sid, timeout=30)
    assert state.status == "failed"
    assert "max_deliver" in state.reason
    assert api.requests == []


async def test_an_exhaustion_announced_while_no_agent_runs_is_recorded_by_the_next_agent(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """The server sends its advisory once, on a core subject; the stream keeps it for later."""
    bus = client.bus
    puller = await bus.pull(bus.ns.pool_consumer("p", ack_wait_s=1.0, max_deliver=1))
    sid = await client.submit("do it", pool="p")
    assert len(await puller.fetch(1, timeout=5.0)) == 1  # the one delivery, taken by an agent that dies
    await puller.close()
    # no agent anywhere: the advisory must still be kept
    await until(lambda: _captured(bus), "the max-deliveries advisory to be stored", timeout=30)
    assert (await client.state(sid)).status != "failed"
    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path, max_deliver=1, ack_wait_s=1.0):
            state = await client.wait(sid, timeout=30)
            await until(lambda: _drained(bus), "the advisory to be acked", timeout=10)
    assert state.status == "failed"
    assert "max_deliver" in state.reason
    assert api.requests == []


async def _captured(bus: Bus) -> bool:
    return await bus.stream_last_seq(bus.ns.exhausted_stream) > 0


async def _drained(bus: Bus) -> bool:
    return await bus.consumer_backlog(bus.ns.exhausted_consumer("p")) == (0, 0)


async def test_where_the_account_already_archives_advisories_agents_listen_live(tmp_path: Path) -> None:
    """A stream of the account's own on `$JS.EVENT.ADVISORY.>` overlaps ours: nothing may break."""
    with NatsServer(store_dir=tmp_path / "nats") as server:
        settings = Settings(nats_url=server.url, prefix="own", creds=str(server.admin_creds))
        nc = await raw_connect(settings)
        await nc.jetstream().add_stream(name="ARCHIVE", subjects=["$JS.EVENT.ADVISORY.>"])
        await nc.close()
        async with agentbus.connect(settings=settings) as client:  # provisioning goes on without it
            assert not await client.bus.stream_exists(client.bus.ns.exhausted_stream)
            bus = client.bus
            puller = await bus.pull(bus.ns.pool_consumer("p", ack_wait_s=1.0, max_deliver=1))
            with FakeMessagesAPI() as api:
                async with agent(settings, api, tmp_path / "w", max_deliver=1, ack_wait_s=1.0):
                    sid = await client.submit("do it", pool="p")
                    assert len(await puller.fetch(1, timeout=5.0)) == 1
                    await puller.close()
                    state = await client.wait(sid, timeout=30)
    assert state.status == "failed"
    assert "max_deliver" in state.reason
