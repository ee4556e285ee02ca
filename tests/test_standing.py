"""The consume loop's standing pull requests: few requests, nothing lost after a server restart, a
deleted consumer stops the loop, and a drain hands back what arrived unstarted.

Real nats-server; the requests are counted on a core subscription to the API subject they go to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.aio.msg
import pytest

import agentbus
from agentbus.bus import Bus, Job
from agentbus.config import Settings
from agentbus.errors import BusError
from agentbus.server import NatsServer
from agentbus.service import Consumer, LogOnly, consume
from agentbus.subjects import ConsumerSpec
from services.agent.worker import AgentConfig, AgentWorker
from tests.helpers import until

pytestmark = pytest.mark.timeout(60)


def spec_of(bus: Bus) -> ConsumerSpec:
    return bus.ns.pool_consumer("standing", ack_wait_s=30.0)


@asynccontextmanager
async def consuming(
    bus: Bus, handled: list[bytes], *, slots: int, draining: asyncio.Event | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    async def handle(job: Job) -> None:
        handled.append(job.data)

    draining = draining or asyncio.Event()
    consumer = Consumer(spec=spec_of(bus), handle=handle, settle=LogOnly("test"), concurrency=slots)
    loop = asyncio.create_task(consume(bus, consumer, draining, fetch_timeout=0.2))
    try:
        yield loop
    finally:
        draining.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(loop, 10)


async def publish(bus: Bus, n: int, tag: str = "m") -> None:
    await bus.publish(bus.ns.work("standing"), f"{tag}{n}".encode(), msg_id=f"{tag}-{n}")


async def test_a_loop_asks_the_server_about_once_per_half_its_slots_not_once_per_message() -> None:
    """One message at a time through 8 slots: a fetch per message asked 40 times; standing requests
    topped up at half the slots ask about 40 / 4 times. (A private server without authorization, so
    a plain subscription sees the requests.)"""
    with NatsServer(auth=False) as server:
        bus = await Bus.connect(Settings(nats_url=server.url, prefix="asks"))
        await bus.provision()
        nc = await nats.connect(server.url)
        asked: list[str] = []

        async def count(msg: nats.aio.msg.Msg) -> None:
            asked.append(msg.subject)

        await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{bus.ns.work_stream}.>", cb=count)
        await nc.flush()
        handled: list[bytes] = []
        try:
            async with consuming(bus, handled, slots=8):
                for i in range(40):
                    await publish(bus, i)
                    await until(lambda i=i: _count(handled, i + 1), f"message {i} handled", timeout=10)
            await nc.flush()
        finally:
            await nc.close()
            await bus.close()
    assert handled == [f"m{i}".encode() for i in range(40)]
    assert 1 <= len(asked) <= 12, asked


async def _count(handled: list[bytes], n: int) -> bool:
    return len(handled) >= n


async def test_after_a_server_restart_the_loop_asks_again_and_gets_new_work(tmp_path: Path) -> None:
    """Requests waiting on the server die with it; the client's reconnect says so, and the loop asks again."""
    server = await asyncio.to_thread(NatsServer(store_dir=tmp_path).start)
    try:
        settings = agentbus.Settings(nats_url=server.url, prefix="restart", creds=str(server.admin_creds))
        bus = await Bus.connect(settings)
        await bus.provision()
        handled: list[bytes] = []
        async with consuming(bus, handled, slots=4):
            await publish(bus, 0)
            await until(lambda: _count(handled, 1), "the first message", timeout=10)
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            await until(lambda: _reconnected(bus), "the client to reconnect", timeout=20)
            await publish(bus, 1)
            await until(lambda: _count(handled, 2), "a message published after the restart", timeout=20)
        await bus.close()
    finally:
        await asyncio.to_thread(server.kill)
    assert handled == [b"m0", b"m1"]


async def _reconnected(bus: Bus) -> bool:
    return bus.reconnects > 0


async def test_a_consumer_deleted_under_a_running_loop_stops_it_with_the_reason(client: agentbus.Client) -> None:
    bus = client.bus
    await bus.provision()
    handled: list[bytes] = []
    async with consuming(bus, handled, slots=4) as loop:
        await publish(bus, 0)
        await until(lambda: _count(handled, 1), "the first message", timeout=10)
        await bus._js.delete_consumer(bus.ns.work_stream, spec_of(bus).durable)
        with pytest.raises(BusError, match="deleted"):
            await asyncio.wait_for(loop, 10)


async def test_a_drain_hands_back_what_arrived_but_never_started(client: agentbus.Client) -> None:
    """Two messages arrive for two slots; the drain begins before the loop starts them: both go back
    to the queue at once (not after an ack wait), where another worker takes them."""
    bus = client.bus
    await bus.provision()
    draining = asyncio.Event()
    second: list[bytes] = []
    standing = await bus.standing(spec_of(bus), 2)
    await standing.take(2, timeout=0.1)  # the request for both slots is open
    await publish(bus, 0)
    await publish(bus, 1)
    await until(lambda: _buffered(standing, 2), "both messages delivered", timeout=10)
    from agentbus.service import _give_back

    await _give_back(standing, [])
    async with consuming(bus, second, slots=2, draining=draining):
        await until(lambda: _count(second, 2), "both messages taken by another loop", timeout=5)
    assert sorted(second) == [b"m0", b"m1"]


async def _buffered(standing: object, n: int) -> bool:
    feed = getattr(standing, "_feed", None)
    return feed is not None and len(feed.msgs) >= n


async def test_a_wake_up_arriving_as_its_run_parks_waits_for_the_run_instead_of_a_redelivery(
    settings: Settings, tmp_path: Path
) -> None:
    """The worker's `_finishes`: a run that ends within a moment lets the item through at once."""
    async with await Bus.connect(settings) as bus:
        config = AgentConfig(pool="p", model="scripted:agentbus/scripted/demo.json", workdir=tmp_path)
        worker = AgentWorker(bus, config)
        worker._runs["s1"] = object()  # type: ignore[assignment]
        asyncio.get_running_loop().call_later(0.2, worker._runs.pop, "s1")
        assert await worker._finishes("s1")
        worker._runs["s2"] = object()  # type: ignore[assignment]
        assert not await worker._finishes("s2")  # still running after the moment: redelivered later


async def test_a_refused_request_is_not_made_again_at_once(client: agentbus.Client) -> None:
    """A pull request the server refuses (409: too many waiting, a batch over the consumer's limit, a
    leader that moved) is made again after a pause, not in a tight loop against the server. Every
    request here is answered by a 409 from the server's side of the feed."""
    from nats.aio.msg import Msg

    bus = client.bus
    await bus.provision()
    standing = await bus.standing(spec_of(bus), 4)
    made: list[int] = []

    async def refused(feed: object, batch: int) -> None:
        reply = feed.open_request(batch)  # type: ignore[attr-defined]
        made.append(batch)
        status = Msg(bus._nc, subject=reply, headers={"Status": "409", "Description": "Exceeded MaxWaiting"})
        asyncio.get_running_loop().call_soon(feed.set_result, status)  # type: ignore[attr-defined]

    standing._request = refused  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 1.2:
        assert await standing.take(4, timeout=0.05) == []
    await standing.close()
    assert 2 <= len(made) <= 4, f"{len(made)} requests in 1.2 s"


async def test_a_message_carrying_its_own_status_header_is_still_a_message(client: agentbus.Client) -> None:
    """Anyone who may publish a work item or a record may set any header, "Status" too: the loop, a
    batched read and a tap tell the server's status answers from stored messages by other means."""
    bus = client.bus
    await bus.provision()
    handled: list[bytes] = []
    async with consuming(bus, handled, slots=2):
        for i, status in enumerate(("100", "408", "409", "204")):
            await bus.publish(
                bus.ns.work("standing"), f"s{i}".encode(), msg_id=f"status-{i}", headers={"Status": status}
            )
        await until(lambda: _count(handled, 4), "all four work items handled", timeout=10)
    assert sorted(handled) == [b"s0", b"s1", b"s2", b"s3"]

    from agentbus.messages import HumanMessage, encode

    subject = bus.ns.session_input("st1", bus.user)
    for i, status in enumerate(("204", "404", "100")):
        event = HumanMessage(id=f"say-{i}", text=f"hello {i}", author=bus.user)
        await bus.publish(subject, encode(event), msg_id=f"st1:say-{i}", headers={"Status": status})
    read = await client.log.read("st1")
    tapped = [r async for r in client.log.tap("st1", follow=False)]
    assert [r.event.id for r in read] == ["say-0", "say-1", "say-2"]
    assert [r.event.id for r in tapped] == ["say-0", "say-1", "say-2"]


def test_requests_filled_without_a_status_are_forgotten_after_their_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request filled to its batch ends with no status; the loop forgets it once it would have
    expired, oldest first, and keeps the ones still open (an end that says nothing counts them)."""
    from agentbus.bus import _queues

    now = [1000.0]
    monkeypatch.setattr(_queues.time, "monotonic", lambda: now[0])
    feed = _queues._Pulls("_INBOX.test", "standing")
    old = [feed.open_request(8) for _ in range(50)]
    now[0] += 2 * _queues._PULL_EXPIRES_S - 1
    recent = feed.open_request(4)
    assert set(feed._batches) == {*old, recent}
    now[0] += 2
    newest = feed.open_request(2)
    assert list(feed._batches) == [recent, newest]
    feed.outstanding = 6
    feed.ended(recent, None)  # no count: all of its batch
    assert feed.outstanding == 2 and list(feed._batches) == [newest]


@pytest.mark.parametrize("kept_alive", [True, False])
async def test_a_job_kept_alive_past_its_ack_wait_is_not_delivered_again(
    client: agentbus.Client, kept_alive: bool
) -> None:
    """`Job.kept_alive` beats while the body runs: a job held three ack waits is still this holder's,
    and the beats stop with the body. Without it, the same job goes to the next fetch."""
    bus = client.bus
    puller = await bus.pull(bus.ns.pool_consumer("alive", ack_wait_s=1.0))
    await bus.publish(bus.ns.work("alive"), b"long", msg_id="long-1")
    (job,) = await puller.fetch(1, timeout=5.0)
    if kept_alive:
        async with job.kept_alive(0.3):
            again = await puller.fetch(1, timeout=3.0)
        assert again == []
        await asyncio.sleep(1.5)  # no beat after the body: it is delivered again after one ack wait
        assert [j.attempt for j in await puller.fetch(1, timeout=3.0)] == [2]
    else:
        assert [j.attempt for j in await puller.fetch(1, timeout=3.0)] == [2]
    await puller.close()
