"""A real three-node NATS cluster (what compose/cluster.yaml runs): with AGENTBUS_REPLICAS=3
every stream and bucket has three replicas, and a session outlives the loss of a server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

import agentbus
from agentbus import openings
from agentbus.bus import Outgoing
from agentbus.config import Settings
from agentbus.errors import AgentBusError, FencedError
from agentbus.messages import HumanMessage, Record, StatusChanged, encode
from agentbus.server import NatsServer
from agentbus.testing import text_response, tool_use_response
from services.supervisor.pools import Fleet, PoolSpec
from tests.helpers import POOL, PaperSpawner, agent_with_fake, free_ports, raw_connect, supervising, ticks_pass, until
from tests.test_openings import routing, starts

__all__ = ["starts"]  # a fixture, imported so pytest sees it here


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports = free_ports(6)
    ports, routes = ports[:3], ports[3:]
    urls = [f"nats://127.0.0.1:{p}" for p in routes]
    nodes = [
        # one users file for the three: every node authorizes the same users the same way
        NatsServer(
            port=p,
            store_dir=tmp_path / f"n{i}",
            server_name=f"n{i}",
            cluster_port=r,
            routes=urls,
            auth_dir=tmp_path / "auth",
            admin="admin",
        )
        for i, (p, r) in enumerate(zip(ports, routes, strict=True))
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.close()


async def _connect_when_ready(settings: Settings, stack: AsyncExitStack) -> agentbus.Client:
    """The first client provisions; JetStream answers only once the cluster has a meta leader."""
    for _ in range(150):
        try:
            return await stack.enter_async_context(agentbus.connect(settings=settings))
        except AgentBusError:
            await asyncio.sleep(0.2)
    raise AssertionError("the cluster's JetStream never became available")


def respond(request: dict[str, object]) -> dict[str, object]:
    if any(m["role"] == "assistant" for m in request["messages"]):  # type: ignore[attr-defined]
        return text_response("replicated")
    return tool_use_response("write_file", {"path": "r.txt", "content": "three copies"})


@pytest.mark.timeout(180)
async def test_three_replicas_keep_a_session_through_the_loss_of_its_leader(
    cluster: list[NatsServer], tmp_path: Path, prefix: str
) -> None:
    creds = str(cluster[0].admin_creds)
    settings = Settings(nats_url=",".join(n.url for n in cluster), prefix=prefix, replicas=3, creds=creds)
    async with AsyncExitStack() as stack:
        client = await _connect_when_ready(settings, stack)
        fleet = Fleet({POOL: PoolSpec(name=POOL, model="x", min=0, max=1)})
        sup = await stack.enter_async_context(supervising(settings, fleet, PaperSpawner(), bus=client.bus))
        async with agent_with_fake(settings, tmp_path / "w", responder=respond):
            first = await client.submit("before the loss", pool=POOL)
            assert (await client.wait(first, timeout=60)).status == "completed"
            before = [r.seq for r in await client.show(first)]

            # SIGKILL the server leading the session stream: its log must move to a new leader
            leader = await _leader(cluster, f"{prefix.upper()}_SESSIONS")
            victim = next(n for n in cluster if n.server_name == leader)
            victim.kill()
            # a pipelined batch sent into the failover: every event stored, none twice
            notes = [HumanMessage(id=f"note-{i}", text=f"note {i}", author="test") for i in range(50)]
            acks = await client.log.append_many(first, notes, channel="input")
            second = await client.submit("after the loss", pool=POOL)
            state = await client.wait(second, timeout=90)
            after = [r.seq for r in await client.show(first)]
            survivors = [n for n in cluster if n is not victim]
            new_leader = await _leader(survivors, f"{prefix.upper()}_SESSIONS")
            await ticks_pass(sup, 5)  # the supervisor kept working after the loss
    assert state.status == "completed"
    assert after[: len(before)] == before
    stored = [r.event.id for r in await _read(settings, first) if isinstance(r.event, HumanMessage)]
    assert sorted(stored) == sorted(n.id for n in notes) and len(acks) == 50
    assert new_leader in {n.server_name for n in survivors}

    survivor = next(n for n in cluster if n is not victim)
    nc = await raw_connect(settings.with_(nats_url=survivor.url))
    try:
        infos = await nc.jetstream().streams_info()
    finally:
        await nc.close()
    mine = [i for i in infos if i.config.name and i.config.name.startswith(prefix.upper())]
    kv = [i for i in infos if i.config.name and i.config.name.startswith(f"KV_{prefix.upper()}")]
    assert mine and kv
    assert {i.config.num_replicas for i in mine + kv} == {3}


async def _read(settings: Settings, sid: str) -> list[Record]:
    async with agentbus.connect(settings=settings) as client:
        return await client.show(sid)


async def _leader(nodes: list[NatsServer], stream: str) -> str:
    for node in nodes:
        try:
            nc = await raw_connect(Settings(nats_url=node.url, creds=str(node.admin_creds)), connect_timeout=2)
        except Exception:
            continue
        try:
            for _ in range(100):
                info = await nc.jetstream().stream_info(stream)
                if info.cluster and info.cluster.leader:
                    return str(info.cluster.leader)
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
    raise AssertionError(f"no leader for {stream}")


@pytest.mark.timeout(180)
async def test_on_three_replicas_a_routed_session_starts_from_its_opening_and_a_late_message_is_read(
    cluster: list[NatsServer], tmp_path: Path, prefix: str, starts: list[tuple[str, str]]
) -> None:
    # the whole-session fences (Nats-Expected-Last-Subject-Sequence-Subject) on replicated streams
    creds = str(cluster[0].admin_creds)
    settings = Settings(nats_url=",".join(n.url for n in cluster), prefix=prefix, replicas=3, creds=creds)
    async with AsyncExitStack() as stack:
        client = await _connect_when_ready(settings, stack)
        await stack.enter_async_context(routing(settings))
        await until(lambda: openings.WorkKey(client.bus).get(), "the work key", timeout=30)
        late = await client.submit("routed before any agent")
        await until(lambda: _routed(client, late), "the route", timeout=30)
        await client.say(late, "said after the route")
        async with agent_with_fake(settings, tmp_path / "w", responder=lambda _: text_response("done")) as (api, w):
            assert (await client.wait(late, timeout=60)).status == "completed"
            await until(lambda: w._context.work_key.get(), "the agent's key", timeout=30)  # type: ignore[union-attr]
            fresh = await client.submit("routed while an agent waits")
            assert (await client.wait(fresh, timeout=60)).status == "completed"
        # A replicated stream checks an expected last message id only as it applies the entry, and
        # a mismatch there halts the stream for good (nats-server 2.15): a chained end is never
        # sent to a cluster. Here the answer is fenced out, and the stream must still take writes.
        assert not client.bus.one_server
        subject = client.bus.ns.session_log(fresh)
        head = Outgoing(subject, encode(StatusChanged(id="late", status="running")), f"{fresh}:late:1-1")
        tail = Outgoing(subject, encode(StatusChanged(id="later", status="running")), f"{fresh}:later")
        with pytest.raises(FencedError):
            await client.bus.publish_chained(head, tail, expected_last_subject_seq=1)
        note = HumanMessage(id="still-taken", text="still taken", author="test")
        await asyncio.wait_for(client.log.append(fresh, note, channel="input"), 20)
    assert starts == [("open", late), ("load", late), ("open", fresh)]
    assert "said after the route" in str(api.requests[0][0]["messages"])


async def _routed(client: agentbus.Client, sid: str) -> bool:
    return any(type(r.event).__name__ == "Routed" for r in await client.show(sid))
