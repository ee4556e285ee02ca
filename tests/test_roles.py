"""The permission matrix on a real server with authorization on: for each role, every action of
subjects.md's table is tried for real (through the Client API where there is one, raw nats-py
for the attacks), and is allowed or refused exactly as the table says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import NotPermitted
from agentbus.messages import Hold, HumanMessage, ResumeRequested, StatusChanged, WorkItem, encode
from agentbus.roles import MATRIX, Row, action_for
from agentbus.spend import SpendLedger
from agentbus.state import SessionState
from tests.conftest import AsUser
from tests.helpers import raw_connect

POOL, OTHER_POOL = "p", "q"


class World:
    """One namespace: a session granted to the scoped users, one that is not, the admin's name."""

    def __init__(self, granted: str, other: str, admin: str) -> None:
        self.granted, self.other, self.admin = granted, other, admin


@pytest.fixture
async def world(client: agentbus.Client) -> World:
    granted = await client.submit("the granted session", pool=POOL)
    other = await client.submit("another session", pool=OTHER_POOL)
    await client.state(granted)  # the admin writes the state cache of both
    await client.state(other)
    return World(granted, other, client.bus.user)


async def raw_outcome(nc: Any, subject: str, act: Callable[[], Awaitable[Any]]) -> str:
    """Run a raw call; "refused" as soon as the server reports a violation for `subject`."""
    errors: list[str] = nc.agentbus_errors
    before = len(errors)
    task = asyncio.ensure_future(act())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            if any(subject.lower() in e.lower() for e in errors[before:]):
                return "refused"
            if task.done():
                task.result()
                return "allowed"
            assert loop.time() < deadline, f"neither an answer nor a refusal for {subject}"
            await asyncio.wait({task}, timeout=0.02)  # polling the error list with a deadline
    finally:
        task.cancel()


Action = Callable[[agentbus.Client, Any, World], Awaitable[Any]]


def _state(sid: str) -> bytes:
    return msgspec.json.encode(SessionState(session_id=sid))


async def _pull(c: agentbus.Client, pool: str) -> None:
    puller = await c.bus.pull(c.bus.ns.pool_consumer(pool))
    await puller.close()


async def _serve(c: agentbus.Client) -> None:
    async def never(_: bytes) -> bytes:
        return b""

    stop = await c.bus.serve(c.bus.ns.scale_requests(), never)
    await stop()


async def _delete_stream(c: agentbus.Client) -> None:
    ns = c.bus.ns
    # an admin deletes one it can do without (provisioning makes it again); others try the log
    await c.bus.delete_stream(ns.exhausted_stream if c.bus.identity.role == "admin" else ns.sessions_stream)


async def _unscoped(c: agentbus.Client, nc: Any) -> str:
    stream = c.bus.ns.sessions_stream
    subject = f"$JS.API.CONSUMER.CREATE.{stream}"
    body = {"stream_name": stream, "config": {"deliver_subject": nc.new_inbox(), "ack_policy": "none"}}
    return await raw_outcome(nc, subject, lambda: nc.request(subject, json.dumps(body).encode(), timeout=5))


async def _list_consumers(c: agentbus.Client, nc: Any) -> str:
    subject = f"$JS.API.CONSUMER.LIST.{c.bus.ns.work_stream}"
    return await raw_outcome(nc, subject, lambda: nc.request(subject, b"{}", timeout=5))


async def _publish_raw(nc: Any, subject: str) -> str:
    async def act() -> None:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await nc.flush()  # see Bus.serve: the first pong may be one owed for an earlier ping

    return await raw_outcome(nc, subject, act)


async def _subscribe_raw(nc: Any, subject: str) -> str:
    async def act() -> None:
        await nc.subscribe(subject)
        await nc.flush()
        await nc.flush()

    return await raw_outcome(nc, subject, act)


ACTIONS: dict[str, Action] = {
    "read": lambda c, nc, w: c.show(w.granted),
    "read_other": lambda c, nc, w: c.show(w.other),
    "look_other": lambda c, nc, w: c.log.last_seq(w.other),
    "list": lambda c, nc, w: c.log.session_ids(),
    "pools": lambda c, nc, w: _list_consumers(c, nc),
    "tap_all": lambda c, nc, w: anext(c.tap(None, start="start", follow=False)),
    "state_other": lambda c, nc, w: c.bus.kv_get(c.bus.ns.state_bucket, w.other),
    "submit": lambda c, nc, w: c.submit("a new task", pool=POOL),
    "submit_router": lambda c, nc, w: c.submit("a task for the router"),
    "queue": lambda c, nc, w: c.bus.publish(
        c.bus.ns.work(OTHER_POOL), encode(WorkItem(session_id=w.other)), msg_id=f"{w.other}:{c.bus.user}"
    ),
    "say": lambda c, nc, w: c.say(w.granted, "hello"),
    "say_other": lambda c, nc, w: c.say(w.other, "hello"),
    "say_as": lambda c, nc, w: c.bus.publish(
        c.bus.ns.session_input(w.granted, w.admin if c.bus.user != w.admin else "someone"),
        encode(HumanMessage(id=f"as-{c.bus.user}", text="I am someone else", author="")),
        msg_id=f"as-{c.bus.user}",
    ),
    "resume": lambda c, nc, w: c.log.append(
        w.granted, ResumeRequested(id=f"resume-{c.bus.user}", author=""), channel="control"
    ),
    "write_log": lambda c, nc, w: c.log.append(w.granted, StatusChanged(id=f"log-{c.bus.user}", status="running")),
    "write_state": lambda c, nc, w: c.bus.kv_put(c.bus.ns.state_bucket, w.granted, _state(w.granted)),
    "hold": lambda c, nc, w: SpendLedger(c.bus).set_hold(POOL, Hold(limit="pool_ceiling_usd", detail="matrix")),
    "reset_spend": lambda c, nc, w: c.reset_spend(POOL),
    "reset_other": lambda c, nc, w: SpendLedger(c.bus).add(OTHER_POOL, 0.0),
    "fetch": lambda c, nc, w: _pull(c, POOL),
    "fetch_other": lambda c, nc, w: _pull(c, OTHER_POOL),
    "work_key": lambda c, nc, w: c.bus.kv_get(c.bus.ns.keys_bucket, "work"),
    "make_work_key": lambda c, nc, w: c.bus.kv_put(c.bus.ns.keys_bucket, "work", b"bWF0cml4"),
    "registry": lambda c, nc, w: c.bus.kv_put(c.bus.ns.workers_bucket, c.bus.user, b"{}"),
    "announce": lambda c, nc, w: c.bus.kv_put(c.bus.ns.supervisors_bucket, c.bus.user, b"{}"),
    "supervisors": lambda c, nc, w: c.supervisors(),
    "hear_people": lambda c, nc, w: _subscribe_raw(nc, f"{c.bus.ns.prefix}.session.*.*.*"),
    "hear_hold": lambda c, nc, w: _subscribe_raw(nc, f"$KV.{c.bus.ns.spend_bucket}.hold.{POOL}"),
    "scale": lambda c, nc, w: c.request_workers(POOL),
    "serve_scale": lambda c, nc, w: _serve(c),
    "advisory": lambda c, nc, w: _publish_raw(nc, c.bus.ns.exhausted(POOL)),
    "create_stream": lambda c, nc, w: c.bus.ensure_stream(c.bus.ns.streams()[0], update=True),
    "delete_stream": lambda c, nc, w: _delete_stream(c),
    "delete_consumer": lambda c, nc, w: c.bus.delete_consumer(c.bus.ns.work_stream, f"pool-{POOL}"),
    "unscoped": lambda c, nc, w: _unscoped(c, nc),
    "inbox_other": lambda c, nc, w: _subscribe_raw(nc, f"_INBOX_{w.admin if c.bus.user != w.admin else 'x'}.x"),
}


async def _outcome(action: Action, c: agentbus.Client, nc: Any, w: World) -> str:
    try:
        result = await asyncio.wait_for(action(c, nc, w), 20)
    except NotPermitted:
        return "refused"
    except agentbus.AgentBusError:
        return "allowed"  # past the server's permissions (e.g. nobody answers a scale request)
    return result if result in ("allowed", "refused") else "allowed"


VARIANTS = [
    ("admin", False), ("service", False), ("agent", True), ("agent", False), ("operator", False),
    ("codriver", True), ("codriver", False), ("observer", True), ("observer", False),
]  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("role", "scoped"), VARIANTS, ids=[f"{r}-{'granted' if s else 'all'}" for r, s in VARIANTS])
async def test_each_role_may_do_exactly_what_the_permissions_table_says(
    role: str, scoped: bool, world: World, settings: Settings, as_user: AsUser
) -> None:
    if role == "admin":
        mine = settings
    else:
        grants: dict[str, Any] = {}
        if scoped and role in ("codriver", "observer"):
            grants["sessions"] = [world.granted]
        if scoped and role == "agent":
            grants["pools"] = [POOL]
        mine = as_user(role, role, **grants)
    expected = {row.key: _expected(row, role, scoped) for row in MATRIX}
    got: dict[str, str] = {}
    async with agentbus.connect(settings=mine) as c:
        nc = await raw_connect(mine)
        try:
            for row in MATRIX:
                got[row.key] = await _outcome(ACTIONS[row.key], c, nc, world)
        finally:
            await nc.close()
    wrong = {k: f"{got[k]}, table says {expected[k]}" for k in expected if got[k] != expected[k]}
    assert not wrong, f"{role} ({'granted one' if scoped else 'granted all'}): {wrong}"


def _expected(row: Row, role: str, scoped: bool) -> str:
    cell = row.cell(role)
    return "allowed" if cell == "yes" or (cell == "if all" and not scoped) else "refused"


def test_every_action_of_the_table_is_tried() -> None:
    assert set(ACTIONS) == {row.key for row in MATRIX}


async def test_a_refused_look_at_another_session_names_the_action(client: agentbus.Client, as_user: AsUser) -> None:
    """What a person sees: the action the table names, not the API subject the server refused."""
    mine, theirs = await client.submit("mine", pool="nobody"), await client.submit("theirs", pool="nobody")
    async with agentbus.connect(settings=as_user("olive", "observer", sessions=[mine])) as c:
        for call in (lambda: c.show(theirs), lambda: c.state(theirs), lambda: c.wait(theirs, timeout=1)):
            with pytest.raises(NotPermitted, match=r"^not permitted: read another session \(observer olive-"):
                await call()


def test_a_refused_subject_is_named_by_an_action_some_role_may_not_take() -> None:
    """A tap of a session not granted makes a consumer on the same pattern as a granted one; the
    refusal names reading another session, never the read every role may make."""
    subject = "$JS.API.CONSUMER.CREATE.AGENTBUS_SESSIONS.c1.agentbus.session.SX.>"
    assert action_for(subject, "olive") == "read another session"
