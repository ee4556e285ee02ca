"""Poisoned input never leaves a service alive and idle.

For each input that once crashed a service or stalled it while it stayed alive: the service
keeps working (the next good submission completes), the bad message has a recorded reason where
a session is identifiable, and nothing already in any log changes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    InputRejected,
    ModelResponded,
    RevisionRequested,
    Routed,
    SessionCreated,
    SessionEnded,
    Task,
    WorkItem,
    encode,
    to_builtins,
)
from agentbus.models import ScriptedModel
from agentbus.server import NatsServer
from agentbus.service import Service
from agentbus.subjects import ConsumerSpec
from services.agent.worker import AgentConfig, AgentWorker
from services.evaluator.evaluator import Evaluator
from services.router.router import Router
from services.router.routes import RouteTable
from tests.helpers import until

DEEP = b'{"a":' * 3000 + b"1" + b"}" * 3000  # msgspec raises RecursionError, not a decode error
RANDOM = bytes(range(256)) * 4


def _script(tmp_path: Path, text: str = "done") -> ScriptedModel:
    path = tmp_path / "script.json"
    body = {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": {}}
    path.write_text(json.dumps({"responses": [body]}))
    return ScriptedModel(path)


@asynccontextmanager
async def _running(service: Service, bus: Bus) -> AsyncIterator[asyncio.Task[None]]:
    runner = asyncio.create_task(service.run())
    try:
        yield runner
    finally:
        await service.shutdown()
        await runner
        await bus.close()


@asynccontextmanager
async def _router(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    bus = await Bus.connect(settings)
    async with _running(Router(bus, RouteTable(default_pool="p")), bus) as runner:
        yield runner


@asynccontextmanager
async def _agent(settings: Settings, tmp_path: Path, pool: str = "p") -> AsyncIterator[asyncio.Task[None]]:
    bus = await Bus.connect(settings)
    model = _script(tmp_path)
    async with _running(AgentWorker(bus, AgentConfig(pool=pool, model=model.name, workdir=tmp_path), model), bus) as r:
        yield r


@asynccontextmanager
async def _evaluator(settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    bus = await Bus.connect(settings)
    async with _running(Evaluator(bus, None), bus) as runner:
        yield runner


async def _empty(client: agentbus.Client, spec: ConsumerSpec) -> bool:
    return await client.bus.consumer_backlog(spec) == (0, 0)


async def _log_of(client: agentbus.Client, sid: str) -> list[object]:
    return [to_builtins(r) for r in await client.show(sid)]


# --- the router --------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [RANDOM, DEEP, b"[]", b'{"session_id": 7}'], ids=["random", "deep", "list", "int"])
async def test_the_router_drops_garbage_on_the_submit_subject_and_keeps_routing(
    client: agentbus.Client, settings: Settings, tmp_path: Path, payload: bytes
) -> None:
    earlier = await client.submit("recorded before the garbage", pool="elsewhere")
    before = await _log_of(client, earlier)
    await client.bus.publish(client.bus.ns.submissions(), payload, msg_id="poison")
    async with _router(settings) as router, _agent(settings, tmp_path):
        await until(lambda: _empty(client, client.bus.ns.router_consumer()), "the garbage to be dropped")
        sid = await client.submit("a good one after the garbage")
        assert (await client.wait(sid, timeout=20)).status == "completed"
        assert not router.done(), "the router stopped"
    assert await _log_of(client, earlier) == before


async def test_a_session_whose_task_names_an_invalid_pool_ends_failed_with_the_reason(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    # a foreign client writes the session by hand, with a pool no subject can carry
    bad = Task(session_id="badpool1", prompt="x", pool="not a pool")
    await client.log.append("badpool1", SessionCreated(id="created", task=bad))
    await client.bus.publish(client.bus.ns.submissions(), encode(WorkItem(session_id="badpool1")), msg_id="bp")
    async with _router(settings) as router, _agent(settings, tmp_path):
        state = await client.wait("badpool1", timeout=20)
        sid = await client.submit("a good one after it")
        assert (await client.wait(sid, timeout=20)).status == "completed"
        assert not router.done()
    assert state.status == "failed"
    assert "not a valid pool name" in state.reason
    rejected = [r.event for r in await client.show("badpool1") if isinstance(r.event, InputRejected)]
    assert rejected and "not a pool" in rejected[0].reason


async def test_a_session_ended_on_a_subject_with_an_invalid_id_does_not_stop_a_fan_out(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    weird = f"{settings.prefix}.session.we$ird.log"
    await client.bus.publish(weird, encode(SessionEnded(id="ended", status="completed")), msg_id="weird")
    async with _router(settings) as router, _agent(settings, tmp_path):
        sid = await client.submit("two opinions after the poison", opinions=["p", "p"])
        state = await client.wait(sid, timeout=30)
        assert not router.done()
    assert state.status == "completed"
    assert state.reason == "2 of 2 opinions completed"


# --- the evaluator -----------------------------------------------------------------------------------


async def test_the_evaluator_drops_a_deeply_nested_item_and_keeps_grading(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    await client.bus.publish(client.bus.ns.evaluations(), DEEP, msg_id="deep-eval")
    async with _evaluator(settings) as evaluator, _agent(settings, tmp_path):
        await until(lambda: _empty(client, client.bus.ns.evaluator_consumer()), "the deep item to be dropped")
        sid = await client.submit("checked after the poison", pool="p", checks=["true"])
        state = await client.wait(sid, timeout=30)
        assert not evaluator.done(), "the evaluator stopped"
    assert state.status == "completed"


async def test_a_session_with_no_pool_that_needs_revision_ends_failed_instead_of_crashing_the_evaluator(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    # a result handed to the evaluator for a session that was never routed anywhere
    await client.log.append("nopool1", SessionCreated(id="created", task=Task(session_id="nopool1", prompt="x",
                                                                                  checks=("false",))))  # fmt: skip
    await client.log.append(
        "nopool1", ModelResponded(id="step-1", step=1, model="m", content=({"type": "text", "text": "r"},))
    )
    item = WorkItem(session_id="nopool1", reason="evaluate")
    await client.bus.publish(client.bus.ns.evaluations(), encode(item), msg_id="np")
    async with _evaluator(settings) as evaluator, _agent(settings, tmp_path):
        state = await client.wait("nopool1", timeout=20)
        sid = await client.submit("checked after it", pool="p", checks=["true"])
        assert (await client.wait(sid, timeout=30)).status == "completed"
        assert not evaluator.done()
    assert state.status == "failed"
    assert "no pool to send it back to" in state.reason


async def test_a_revision_goes_to_the_sessions_own_pool_even_after_it_delegated_elsewhere(
    client: agentbus.Client, settings: Settings
) -> None:
    from agentbus.messages import DelegationRequested

    sid = await client.submit("x", pool="coder", checks=["false"], max_rounds=2)
    await client.log.append(
        sid, DelegationRequested(id="delegate-1", child_session=f"{sid}-c", pool="reviewers", prompt="review")
    )
    await client.log.append(
        sid, ModelResponded(id="step-1", step=1, model="m", content=({"type": "text", "text": "r"},))
    )
    await client.bus.publish(
        client.bus.ns.evaluations(), encode(WorkItem(session_id=sid, reason="evaluate")), msg_id="e"
    )
    async with _evaluator(settings):
        await until(lambda: _revised(client, sid), "the revision")
    queued = await client.bus.subject_counts(client.bus.ns.work_stream, client.bus.ns.work_all())
    # the first round's item (no agent serves coder here) and the revision; nothing for reviewers
    assert queued == {client.bus.ns.work("coder"): 2}


async def _revised(client: agentbus.Client, sid: str) -> bool:
    return any(isinstance(r.event, RevisionRequested) for r in await client.show(sid))


# --- agents ------------------------------------------------------------------------------------------


async def test_an_agent_rejects_a_deeply_nested_work_item_and_keeps_serving(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    await client.bus.publish(client.bus.ns.work("p"), DEEP, msg_id="deep-work")
    async with _agent(settings, tmp_path) as agent:
        await until(lambda: _empty(client, client.bus.ns.pool_consumer("p")), "the deep item to be dropped")
        sid = await client.submit("served after the poison", pool="p")
        assert (await client.wait(sid, timeout=20)).status == "completed"
        assert not agent.done()


async def test_an_unreadable_max_deliveries_advisory_is_dropped_once_not_retried_forever(tmp_path: Path) -> None:
    # With authorization on, nobody but the server may publish an advisory; a server without it
    # (an operator's own, or one from before) still must not leave an agent retrying garbage forever.
    with NatsServer(auth=False) as open_server:
        settings = Settings(nats_url=open_server.url, prefix="poison")
        async with agentbus.connect(settings=settings) as client:
            subject = client.bus.ns.exhausted("p")
            for i, junk in enumerate((DEEP, RANDOM, b'{"stream_seq": "seven"}', b'{"stream_seq": -1}')):
                await client.bus.publish(subject, junk, msg_id=f"advisory-{i}")
            async with _agent(settings, tmp_path) as agent:
                await until(lambda: _empty(client, client.bus.ns.exhausted_consumer("p")), "the advisories to go")
                sid = await client.submit("served after them", pool="p")
                assert (await client.wait(sid, timeout=20)).status == "completed"
                assert not agent.done()
            assert await client.bus.stream_last_seq(client.bus.ns.exhausted_stream) == 4


# --- listings ----------------------------------------------------------------------------------------


async def test_sessions_skip_a_subject_with_an_invalid_id_and_list_the_rest(client: agentbus.Client) -> None:
    sid = await client.submit("a real one", pool="p")
    await client.bus.publish(f"{client.bus.ns.prefix}.session.we$ird.log", b"{}", msg_id="weird")
    listed = [s.session_id for s in await client.sessions()]
    assert listed == [sid]


async def test_an_unreadable_state_cache_entry_is_refolded_from_the_log(client: agentbus.Client) -> None:
    sid = await client.submit("cached badly", pool="p")
    await client.bus.kv_put(client.bus.ns.state_bucket, sid, DEEP)
    state = await client.state(sid)
    assert (state.status, state.pool, state.prompt) == ("queued", "p", "cached badly")
    assert [s.session_id for s in await client.sessions()] == [sid]
    await client.bus.kv_put(client.bus.ns.state_bucket, sid, b"\xff\xfe not json")
    assert (await client.state(sid)).status == "queued"


async def test_an_unreadable_registry_entry_is_skipped_by_the_listings(client: agentbus.Client) -> None:
    from agentbus.messages import SupervisorInfo, WorkerInfo

    ns = client.bus.ns
    for bucket in (ns.workers_bucket, ns.supervisors_bucket):
        await client.bus.kv_put(bucket, "bad", DEEP)
        await client.bus.kv_put(bucket, "empty", b"{}")
    await client.bus.kv_put(ns.workers_bucket, "good", msgspec.json.encode(WorkerInfo(worker_id="good", pool="p")))
    await client.bus.kv_put(ns.supervisors_bucket, "good",
                            msgspec.json.encode(SupervisorInfo(supervisor_id="good", pools=("p",))))  # fmt: skip
    assert [w.worker_id for w in await client.workers()] == ["good"]
    assert [s.supervisor_id for s in await client.supervisors()] == ["good"]
    assert [(p.name, p.supervisors) for p in await client.pools()] == [("p", ("good",))]


async def test_routed_sessions_still_carry_their_route_after_the_router_skipped_poison(
    client: agentbus.Client, settings: Settings
) -> None:
    await client.bus.publish(client.bus.ns.submissions(), DEEP, msg_id="deep")
    sid = await client.submit("route me")
    async with _router(settings):
        await until(lambda: _routed(client, sid), "the route")


async def _routed(client: agentbus.Client, sid: str) -> bool:
    return any(isinstance(r.event, Routed) for r in await client.show(sid))


# --- the shape of a service --------------------------------------------------------------------------


async def test_a_service_whose_loop_fails_stops_and_raises_instead_of_idling() -> None:
    class Broken(Service):
        def __init__(self) -> None:
            super().__init__()
            self.drained = False

        async def _serve(self) -> None:
            await self._supervise(loops=[self._fails(), self._waits()], daemons=[self._forever()])

        async def _fails(self) -> None:
            raise RuntimeError("the consumer is gone")

        async def _waits(self) -> None:
            await self._draining.wait()
            self.drained = True

        async def _forever(self) -> None:
            await asyncio.Event().wait()

    service = Broken()
    with pytest.raises(RuntimeError, match="the consumer is gone"):
        await asyncio.wait_for(service.run(), 10)
    assert service.drained, "the healthy loop was told to drain and finished"
    await service.shutdown()  # returns at once: run() is over
    await service.shutdown()


async def test_a_daemon_stuck_in_its_clean_up_does_not_keep_a_service_from_stopping(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("agentbus.service._DAEMON_STOP_S", 0.2)
    release = asyncio.Event()

    class Stubborn(Service):
        async def _serve(self) -> None:
            await self._supervise(loops=[self._draining.wait()], daemons=[self._clings()])

        async def _clings(self) -> None:
            try:
                await asyncio.Event().wait()
            finally:  # a clean-up that waits on something that never comes
                await asyncio.shield(release.wait())

    service = Stubborn()
    runner = asyncio.create_task(service.run())
    await asyncio.sleep(0)
    await asyncio.wait_for(service.shutdown(), 10)  # without the bound: forever
    await runner
    release.set()
    assert "did not stop within" in caplog.text
