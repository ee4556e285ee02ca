"""A real three-node NATS cluster (what compose/cluster.yaml runs): with AGENTBUS_REPLICAS=3
every stream and bucket has three replicas, and a session outlives the loss of a server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import AgentBusError
from agentbus.server import NatsServer
from agentbus.testing import text_response, tool_use_response
from tests.helpers import POOL, agent_with_fake


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports, routes = _free_ports(3), _free_ports(3)
    urls = [f"nats://127.0.0.1:{p}" for p in routes]
    nodes = [
        NatsServer(port=p, store_dir=tmp_path / f"n{i}", server_name=f"n{i}", cluster_port=r, routes=urls)
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
async def test_three_replicas_keep_a_session_through_the_loss_of_a_server(
    cluster: list[NatsServer], tmp_path: Path, prefix: str
) -> None:
    settings = Settings(nats_url=",".join(n.url for n in cluster), prefix=prefix, replicas=3)
    async with AsyncExitStack() as stack:
        client = await _connect_when_ready(settings, stack)
        async with agent_with_fake(settings, tmp_path / "w", responder=respond):
            first = await client.submit("before the loss", pool=POOL)
            assert (await client.wait(first, timeout=60)).status == "completed"
            before = [r.seq for r in await client.show(first)]

            cluster[0].kill()  # SIGKILL one of three: a quorum of two remains
            second = await client.submit("after the loss", pool=POOL)
            state = await client.wait(second, timeout=90)
            after = [r.seq for r in await client.show(first)]
    assert state.status == "completed"
    assert after == before

    nc = await nats.connect(cluster[1].url)
    try:
        js = nc.jetstream()
        infos = await js.streams_info()
    finally:
        await nc.close()
    mine = [i for i in infos if i.config.name and i.config.name.startswith(prefix.upper())]
    kv = [i for i in infos if i.config.name and i.config.name.startswith(f"KV_{prefix.upper()}")]
    assert mine and kv
    assert {i.config.num_replicas for i in mine + kv} == {3}
