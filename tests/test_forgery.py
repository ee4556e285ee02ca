"""Each forged-event finding of issue 13, tried again with authorization on: none of them forges anything now.

Before: an anonymous client listed and deleted every session; an observer cancelled or ended
someone's session; anyone spoke as anyone; anyone held a pool or reset its ledger; a forged state
cache entry overrode the log; a forged max-deliveries advisory failed a healthy session; and
`submit --model` ran whatever model the submitter chose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

import agentbus
from agentbus.config import Settings
from agentbus.errors import NotAuthenticated, NotPermitted
from agentbus.messages import (
    HumanMessage,
    InvalidEvent,
    ResumeRequested,
    SessionEnded,
    encode,
)
from agentbus.server import NatsServer
from agentbus.spend import SpendLedger
from agentbus.state import SessionState
from agentbus.testing import text_response
from services.agent.conversation import build
from tests.conftest import AsUser
from tests.helpers import POOL, agent_with_fake, raw_connect, until


async def test_an_anonymous_client_can_neither_list_nor_delete_anything(
    nats_server: NatsServer, client: agentbus.Client
) -> None:
    sid = await client.submit("private", pool=POOL)
    anonymous = NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await anonymous.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=1)
    finally:
        await anonymous.close()  # nats-py leaves a failed first attempt's socket open
    with pytest.raises(NotAuthenticated, match="requires credentials"):
        async with agentbus.connect(settings=Settings(nats_url=nats_server.url, prefix=client.settings.prefix)):
            pass
    assert [r.seq for r in await client.show(sid)]  # still all there


def test_the_cli_without_credentials_says_so_in_one_line(nats_server: NatsServer, prefix: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTBUS_CREDS"}
    out = subprocess.run(
        [sys.executable, "-m", "agentbus.cli", "sessions", "--nats", nats_server.url, "--prefix", prefix],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 6
    assert out.stderr.count("\n") == 1 and "requires credentials" in out.stderr


async def test_an_observer_can_neither_cancel_nor_end_a_session(client: agentbus.Client, as_user: AsUser) -> None:
    sid = await client.submit("someone's work", pool=POOL)
    observer = as_user("olga", "observer")
    async with agentbus.connect(settings=observer) as seen:
        with pytest.raises(NotPermitted, match="observer"):
            await seen.cancel(sid)
        forged = SessionEnded(id="ended", status="completed", result="forged")
        with pytest.raises(NotPermitted, match="write a session's log"):
            await seen.log.append(sid, forged)
        nc = await raw_connect(observer)  # and without agentbus in the way
        try:
            await nc.publish(client.bus.ns.session_log(sid), encode(forged))
            await nc.flush()
            await nc.flush()
        finally:
            await nc.close()
        assert any("permissions violation" in e for e in nc.agentbus_errors)
    state = await client.state(sid)
    assert (state.status, state.result, state.cancel_requested) == ("queued", "", False)


async def test_a_codriver_cannot_end_a_session_through_its_own_channel(
    client: agentbus.Client, as_user: AsUser
) -> None:
    sid = await client.submit("steer me", pool=POOL)
    async with agentbus.connect(settings=as_user("cora", "codriver", sessions=[sid])) as codriver:
        # the server lets her write her own input subject, but that channel carries steering only
        forged = SessionEnded(id="ended", status="completed", result="forged")
        await codriver.log.append(sid, forged, channel="input")
        raise_budget = ResumeRequested(id="more", author="", budget=agentbus.Budget(max_usd=1e9))
        await codriver.log.append(sid, raise_budget, channel="input")
        with pytest.raises(NotPermitted, match="codriver"):
            await codriver.log.append(sid, raise_budget, channel="control")
    records = await client.show(sid)
    kept = [r.event for r in records if r.channel == "input"]
    assert all(isinstance(e, InvalidEvent) and "not honoured" in e.reason for e in kept) and len(kept) == 2
    state = await client.state(sid)
    assert (state.status, state.result) == ("queued", "")


async def test_say_as_admin_shows_the_real_sender_and_nobody_writes_under_another_name(
    client: agentbus.Client, as_user: AsUser
) -> None:
    sid = await client.submit("who said that?", pool=POOL)
    settings = as_user("cora", "codriver", sessions=[sid])
    async with agentbus.connect(settings=settings) as codriver:
        await codriver.say(sid, "stop everything", author="admin")
        user = codriver.bus.user
        with pytest.raises(NotPermitted, match="say as another user"):
            await codriver.bus.publish(
                client.bus.ns.session_input(sid, client.bus.user),
                encode(HumanMessage(id="x", text="I am the admin", author="")),
                msg_id="x",
            )
    said = [r for r in await client.show(sid) if isinstance(r.event, HumanMessage)]
    assert [(r.sender, r.event.author) for r in said] == [(user, f'{user} (as "admin")')]
    conv = build(await client.show(sid))
    shown = {"type": "text", "text": f'[message from {user} (as "admin")] stop everything'}
    assert shown in conv.messages[0]["content"]


async def test_nobody_but_services_holds_a_pool_and_an_agent_adds_only_to_its_own(
    client: agentbus.Client, as_user: AsUser
) -> None:
    for role, pools in (("agent", [POOL]), ("operator", []), ("codriver", []), ("observer", [])):
        async with agentbus.connect(settings=as_user(f"h{role}", role, pools=pools)) as who:
            ledger = SpendLedger(who.bus)
            with pytest.raises(NotPermitted):
                await ledger.set_hold(POOL, agentbus.messages.Hold(limit="pool_ceiling_usd", detail="forged"))
            with pytest.raises(NotPermitted):
                await ledger.clear_hold(POOL)
            if role == "agent":
                await ledger.add(POOL, 0.5)  # its own pool: allowed
                with pytest.raises(NotPermitted):
                    await ledger.add("elsewhere", 0.5)
    totals, holds = await client.spend()
    assert holds == {} and totals[POOL].usd == 0.5 and "elsewhere" not in totals


async def test_a_forged_state_cache_entry_never_overrides_the_log(
    client: agentbus.Client, settings: Settings, as_user: AsUser
) -> None:
    sid = await client.submit("the log says queued", pool=POOL)
    forged = SessionState(session_id=sid, status="completed", result="forged", last_seq=10**9)
    # only services and admins may write the cache: an observer's try is refused...
    async with agentbus.connect(settings=as_user("olga", "observer")) as observer:
        with pytest.raises(NotPermitted):
            await observer.bus.kv_put(observer.bus.ns.state_bucket, sid, msgspec.json.encode(forged))
    # ...and one that got there anyway (a buggy or compromised writer) is checked against the log
    await client.bus.kv_put(client.bus.ns.state_bucket, sid, msgspec.json.encode(forged))
    async with agentbus.connect(settings=as_user("olga2", "observer", sessions=[sid])) as reader:
        state = await reader.state(sid)
        listed = await reader.sessions()
        waited = reader.wait(sid, timeout=0.5)
        with pytest.raises(agentbus.Timeout):
            await waited  # still queued: the forged "completed" does not end a wait
    assert (state.status, state.result) == ("queued", "")
    assert [(s.session_id, s.status) for s in listed] == [(sid, "queued")]
    assert (await client.state(sid)).status == "queued"  # and the admin's read repaired the cache
    cached = await client.bus.kv_get(client.bus.ns.state_bucket, sid)
    assert cached is not None and msgspec.json.decode(cached[0], type=SessionState).status == "queued"


async def test_a_forged_max_deliveries_advisory_fails_nothing(
    client: agentbus.Client, settings: Settings, as_user: AsUser, tmp_path: Path
) -> None:
    held = await client.submit("a healthy queued task", pool=POOL)
    work_seq = await client.bus.last_subject_seq(client.bus.ns.work_stream, client.bus.ns.work(POOL))
    advisory = f'{{"stream_seq": {work_seq}}}'.encode()
    for role in ("admin", "service", "agent", "operator", "observer"):
        who = settings if role == "admin" else as_user(f"adv{role}", role)
        nc = await raw_connect(who)
        try:
            await nc.publish(client.bus.ns.exhausted(POOL), advisory)
            await nc.flush()
            await nc.flush()
        finally:
            await nc.close()
        assert any("permissions violation" in e for e in nc.agentbus_errors), role
    # an agent of the pool, which would fail the session on a real advisory, finds none
    async with agent_with_fake(settings, tmp_path, responder=lambda _: text_response("done")) as (_, worker):
        state = await client.wait(held, timeout=30)
        backlog = await client.bus.consumer_backlog(client.bus.ns.exhausted_consumer(POOL))
    assert state.status == "completed"
    assert backlog == (0, 0) and worker.served == 1


async def test_a_model_the_pool_does_not_allow_is_refused_at_submit_and_by_the_agent(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    evil = "scripted:evil.json"  # a script whose tool calls could run anything
    # no agent of the pool is live, so its allow-list is unknown: the submit goes through...
    sid = await client.submit("run my script", pool=POOL, model=evil)
    allowed = ("anthropic:claude-haiku-4-5",)
    async with agent_with_fake(
        settings, tmp_path, responder=lambda _: text_response("done"), allowed_models=allowed
    ) as (api, _):
        # ...and the agent is the backstop: it records why and ends the session without a model call
        state = await client.wait(sid, timeout=30)
        await until(lambda: _registered(client), "the agent's heartbeat")
        with pytest.raises(NotPermitted, match=f"submit --model {evil} to pool {POOL}"):
            await client.submit("run my script", pool=POOL, model=evil)  # now it is known
        ok = await client.submit("a cheaper model, allowed", pool=POOL, model=allowed[0])
    assert state.status == "failed"
    assert f"model {evil} is not allowed on pool {POOL}" in state.reason
    assert not [r for r in api.requests if evil in str(r)]
    assert ok


async def _registered(client: agentbus.Client) -> bool:
    return any(w.pool == POOL and w.allowed_models for w in await client.workers())
