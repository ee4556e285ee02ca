"""Router: durable routing, no double routing, rules in order, pure decisions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import Routed, Task
from services.router.router import Router
from services.router.routes import RouteTable, load_routes

ROUTES = """
default_pool = "general"

[[route]]
name = "code"
tags = ["code"]
pool = "coder"
model = "anthropic:claude-sonnet-4-6"

[[route]]
name = "reviews"
match = "(?i)\\\\breview\\\\b"
pool = "reviewers"
"""


@pytest.fixture
def table(tmp_path: Path) -> RouteTable:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    return load_routes(path)


async def _routed(client: agentbus.Client, sid: str, timeout: float = 10.0) -> list[Routed]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        routed = [r.event for r in await client.show(sid) if isinstance(r.event, Routed)]
        if routed:
            return routed
        await asyncio.sleep(0.05)
    raise AssertionError(f"{sid} was not routed within {timeout}s")


async def _start(settings: Settings, table: RouteTable) -> tuple[Router, asyncio.Task[None], Bus]:
    bus = await Bus.connect(settings)
    router = Router(bus, table)
    return router, asyncio.create_task(router.run()), bus


async def _stop(router: Router, task: asyncio.Task[None], bus: Bus) -> None:
    await router.shutdown()
    await task
    await bus.close()


def test_rules_choose_explicit_then_first_match_then_default(table: RouteTable) -> None:
    def task(prompt: str, *, pool: str | None = None, tags: tuple[str, ...] = ()) -> Task:
        return Task(session_id="s", prompt=prompt, pool=pool, tags=tags)

    assert table.choose(task("x", pool="mine")).rule == "explicit"
    assert table.choose(task("please review this", tags=("code",))).pool == "coder"  # first rule wins
    assert table.choose(task("please Review this")).pool == "reviewers"
    assert table.choose(task("previewing")).pool == "general"
    assert table.choose(task("x", tags=("code",))).model == "anthropic:claude-sonnet-4-6"


@pytest.mark.parametrize(
    "text",
    ['[[route]]\nname = "x"\npool = "a.b"\ntags = ["t"]', '[[route]]\npool = "p"', '[[route]]\npool="p"\nmatch="("'],
)
def test_a_bad_routes_file_is_a_usage_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match="routes file"):
        load_routes(path)


async def test_a_task_submitted_before_any_router_runs_is_routed_when_one_starts(
    client: agentbus.Client, settings: Settings, table: RouteTable
) -> None:
    sid = await client.submit("review my diff please")
    assert (await client.state(sid)).status == "pending"
    router, task, bus = await _start(settings, table)
    try:
        routed = await _routed(client, sid)
    finally:
        await _stop(router, task, bus)
    assert [(r.pool, r.rule) for r in routed] == [("reviewers", "reviews")]
    assert (await client.state(sid)).status == "queued"
    puller = await client.bus.pull(client.bus.ns.pool_consumer("reviewers"))
    jobs = await puller.fetch(5, timeout=2.0)
    await puller.close()
    assert [agentbus.messages.decode_work(j.data).session_id for j in jobs] == [sid]


async def test_two_routers_never_route_the_same_submission_twice(
    client: agentbus.Client, settings: Settings, table: RouteTable
) -> None:
    sids = [await client.submit(f"task {i}", tags=("code",)) for i in range(40)]
    a = await _start(settings, table)
    b = await _start(settings, table)
    try:
        for sid in sids:
            assert len(await _routed(client, sid)) == 1
    finally:
        await _stop(*a)
        await _stop(*b)
    assert a[0].routed + b[0].routed == len(sids)
    puller = await client.bus.pull(client.bus.ns.pool_consumer("coder"))
    queued: list[str] = []
    while batch := await puller.fetch(100, timeout=1.0):
        queued += [agentbus.messages.decode_work(j.data).session_id for j in batch]
    await puller.close()
    assert sorted(queued) == sorted(sids)


async def test_malformed_submissions_are_dropped_and_routing_goes_on(
    client: agentbus.Client, settings: Settings, table: RouteTable
) -> None:
    await client.bus.publish(client.bus.ns.submissions(), b"\x00garbage", msg_id="junk-1")
    await client.bus.publish(client.bus.ns.submissions(), b'{"session_id": "a.b"}', msg_id="junk-2")
    sid = await client.submit("anything")
    router, task, bus = await _start(settings, table)
    try:
        routed = await _routed(client, sid)
    finally:
        await _stop(router, task, bus)
    assert routed[0].pool == "general"


async def test_fan_out_runs_siblings_and_records_an_aggregate_in_the_parent(
    client: agentbus.Client, settings: Settings, table: RouteTable, tmp_path: Path
) -> None:
    from agentbus.messages import OpinionsAggregated
    from agentbus.models import ScriptedModel
    from services.agent.worker import AgentConfig, AgentWorker

    script = tmp_path / "opinion.json"
    script.write_text('[{"content": [{"type": "text", "text": "looks fine"}], "stop_reason": "end_turn", "usage": {}}]')
    model = ScriptedModel(script)
    router, rtask, rbus = await _start(settings, table)
    abus = await Bus.connect(settings)
    agents = [
        AgentWorker(abus, AgentConfig(pool=p, model=model.name, workdir=tmp_path), model) for p in ("coder", "rev")
    ]
    runners = [asyncio.create_task(a.run()) for a in agents]
    try:
        sid = await client.submit("review this diff", opinions=["coder", "rev", "coder"])
        state = await client.wait(sid, timeout=30)
    finally:
        for a in agents:
            await a.shutdown()
        await asyncio.gather(*runners)
        await abus.close()
        await _stop(router, rtask, rbus)
    assert state.status == "completed"
    assert state.reason == "3 of 3 opinions completed"
    aggregate = [r.event for r in await client.show(sid) if isinstance(r.event, OpinionsAggregated)]
    assert len(aggregate) == 1
    assert [(o.pool, o.status, o.result) for o in aggregate[0].results] == [
        ("coder", "completed", "looks fine"),
        ("rev", "completed", "looks fine"),
        ("coder", "completed", "looks fine"),
    ]
    children = [await client.state(o.session_id) for o in aggregate[0].results]
    assert {c.parent_session for c in children} == {sid}
    assert {c.depth for c in children} == {1}


async def test_a_route_can_name_the_model_its_sessions_use(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    from agentbus.models import ScriptedModel
    from services.agent.worker import AgentConfig, AgentWorker

    def script(name: str, text: str) -> Path:
        path = tmp_path / name
        body = {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "usage": {}}
        path.write_text(json.dumps([body]))
        return path

    pool_default, cheap = script("default.json", "from the pool model"), script("cheap.json", "from the cheap model")
    routes = tmp_path / "routes.toml"
    routes.write_text(f'[[route]]\nname = "grading"\ntags = ["cheap"]\npool = "w"\nmodel = "scripted:{cheap}"\n')
    router, rtask, rbus = await _start(settings, load_routes(routes, default_pool="w"))
    abus = await Bus.connect(settings)
    model = ScriptedModel(pool_default)
    # a model other than the pool's runs only where the pool allows it (--allow-model)
    config = AgentConfig(pool="w", model=model.name, workdir=tmp_path, allowed_models=(f"scripted:{cheap}",))
    agent = AgentWorker(abus, config, model)
    runner = asyncio.create_task(agent.run())
    try:
        cheap_sid = await client.submit("grade this", tags=("cheap",))
        plain_sid = await client.submit("write this", pool="w")  # not through the router: the pool's model
        cheap_state = await client.wait(cheap_sid, timeout=20)
        plain_state = await client.wait(plain_sid, timeout=20)
    finally:
        await agent.shutdown()
        await runner
        await abus.close()
        await _stop(router, rtask, rbus)
    assert cheap_state.result == "from the cheap model"
    assert plain_state.result == "from the pool model"


async def test_a_fan_out_whose_siblings_ended_while_no_router_ran_is_aggregated_when_one_starts(
    client: agentbus.Client, settings: Settings, table: RouteTable
) -> None:
    from agentbus.messages import DelegationCompleted, OpinionsAggregated

    router, rtask, rbus = await _start(settings, table)
    try:
        sid = await client.submit("two opinions nobody gives", opinions=["nobody", "nobody"])
        parent = await _until_fanned_out(client, sid)
    finally:
        await _stop(router, rtask, rbus)
    for child in parent.children:  # no agent took them: cancelled, and each says so to the router's queue
        await client.cancel(child, reason="changed my mind")
    assert (await client.state(sid)).status == "running"

    router, rtask, rbus = await _start(settings, table)
    try:
        state = await client.wait(sid, timeout=30, raise_on_failure=False)
    finally:
        await _stop(router, rtask, rbus)
    assert (state.status, state.reason) == ("failed", "0 of 2 opinions completed")
    records = [r.event for r in await client.show(sid)]
    done = [e for e in records if isinstance(e, DelegationCompleted)]
    assert sorted((d.child_session, d.status) for d in done) == [(c, "cancelled") for c in sorted(parent.children)]
    assert sum(isinstance(e, OpinionsAggregated) for e in records) == 1


async def _until_fanned_out(client: agentbus.Client, sid: str) -> agentbus.SessionState:
    async def fanned() -> agentbus.SessionState | None:
        state = await client.state(sid)
        return state if len(state.children) == 2 and all([await client.log.exists(c) for c in state.children]) else None

    from tests.helpers import until

    found = await until(fanned, "the fan-out")
    assert found is not None
    return found


async def test_a_child_that_pauses_and_later_ends_notifies_its_parent_each_time_and_a_repeat_once(
    client: agentbus.Client,
) -> None:
    parent = "parent0123456789"
    child = f"{parent}-o1"  # a fan-out sibling: the router is told
    for status, turn in (("paused", 1), ("paused", 1), ("completed", 1), ("completed", 2)):
        await client.queues.settled(child, parent, status=status, turn=turn)
    counts = await client.bus.subject_counts(client.bus.ns.submissions_stream, client.bus.ns.submissions())
    assert counts == {client.bus.ns.submissions(): 3}


async def test_provisioning_as_an_admin_deletes_the_fan_in_durable_earlier_versions_made(
    client: agentbus.Client, settings: Settings
) -> None:
    from agentbus.subjects import ConsumerSpec

    ns = client.bus.ns
    old = ConsumerSpec(stream=ns.sessions_stream, durable="router-fanin", filter_subject=ns.sessions_log_all())
    await client.bus.ensure_consumer(old)

    async def durables() -> set[str]:
        return {c.name for c in await client.bus.consumer_states(ns.sessions_stream)}

    assert "router-fanin" in await durables()
    async with await Bus.connect(settings) as admin:
        await admin.provision(update=True)
        await admin.provision(update=True)  # nothing left to delete: no error either
    assert "router-fanin" not in await durables()


async def test_an_item_that_overtakes_its_creation_by_a_moment_is_routed_without_waiting_its_turn(
    client: agentbus.Client, settings: Settings, table: RouteTable
) -> None:
    """`submit` sends the router's item right behind the creation, to another stream, so the item
    can be stored first: the router looks again for a moment instead of handing it back to wait."""
    from agentbus.messages import SessionCreated, WorkItem

    router, task, bus = await _start(settings, table)
    try:
        sid = "01OVERTAKENBYITSITEM0"
        stopped = asyncio.Event()
        reads = 0
        first = router.log.first

        async def slow_first(session_id: str) -> Any:
            nonlocal reads
            reads += 1
            if reads == 1:  # the creation is published only once the router has looked once
                await client.log.append(sid, SessionCreated(id="created", task=Task(session_id=sid,
                                        prompt="review my diff please")), channel="control")  # fmt: skip
                stopped.set()
                return None
            return await first(session_id)

        router.log.first = slow_first  # type: ignore[method-assign]
        waited: list[str] = []
        unseen = router.queues.unseen

        async def spy(job: Any, item: Any) -> Any:
            waited.append(item.session_id)
            return await unseen(job, item)

        router.queues.unseen = spy  # type: ignore[method-assign]
        await client.queues.enqueue(WorkItem(session_id=sid), "router")
        await asyncio.wait_for(stopped.wait(), 10)
        routed = await _routed(client, sid)
    finally:
        await _stop(router, task, bus)
    assert stopped.is_set() and reads == 2
    assert [(r.pool, r.rule) for r in routed] == [("reviewers", "reviews")]
    assert waited == []  # not handed back to wait its turn
