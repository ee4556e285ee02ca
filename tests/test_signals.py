"""People's records reach a running session through the live signal, and fan-out works under
authentication.

A run reads people's records (a steer, a cancel) from the stream at a step boundary only when the
worker heard a signal for the session (`Transcript.must_look`). The submission is not such a signal
(a run reads it when it takes the session); these tests still let the run outlast the lead
(`SIGNAL_LEAD_S`), with the worker hearing people's channels from before the run read the log, and
check that the run would not look on its own; then a person speaks during a model call held past the
lead, and only the signal can bring what they said in, well before the fallback look (`FALLBACK_S`).
The fan-out test runs the router and the evaluator as `service` users and the agent as an `agent`
user; whoever ends a sibling tells the router, which collects the siblings into the parent.

Real nats-server, the real anthropic SDK against the fake Messages API, services in process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import agentbus
import services.router.router as router_module
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import DelegationCompleted, MessageDelivered, OpinionsAggregated
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI, Responder, text_response, tool_use_response
from services.agent.run import SessionRun
from services.agent.transcript import SIGNAL_LEAD_S
from services.agent.worker import AgentWorker
from services.evaluator.evaluator import Evaluator
from services.evaluator.grading import GRADER_SYSTEM
from services.router.router import Router
from services.router.routes import RouteTable
from tests.conftest import AsUser
from tests.helpers import MODEL_ID, POOL, Gate, agent, until

pytestmark = pytest.mark.timeout(60)
Request = dict[str, Any]

# How long a model call goes on after the person spoke: past the lead in which a run looks in the
# stream anyway, well short of the fallback (FALLBACK_S) after which it looks without a signal.
LONG_STEP_S = SIGNAL_LEAD_S + 0.5


def turns(request: Request) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "assistant")


def texts(message: dict[str, Any]) -> list[str]:
    return [b.get("text", "") for b in message["content"] if b.get("type") == "text"]


async def hearing(worker: AgentWorker) -> bool:
    return worker._people_live.is_set()


async def held_run(worker: AgentWorker, sid: str) -> SessionRun:
    """The run of `sid`, checked to be where only a signal makes its next step boundary look."""
    run = worker._runs[sid]
    assert not run.transcript.must_look(), "the run would look in the stream without a signal: the test proves nothing"
    return run


def held_steps(gates: tuple[Gate, Gate], replies: tuple[Request, Request], then: Request) -> Responder:
    """A responder whose first two model calls are held by `gates` and answer `replies`; later ones `then`."""

    def responder(request: Request) -> Request:
        n = turns(request)
        if n < len(gates):
            gates[n].hold()
            return replies[n]
        return then

    return responder


async def past_the_submission(client: agentbus.Client, worker: AgentWorker, gates: tuple[Gate, Gate]) -> str:
    """Submit once the worker hears people's channels, and let the run reach its second model call,
    its first outlasting the lead of any signal there was."""
    await until(lambda: hearing(worker), "the agent to hear people's channels", timeout=10)
    sid = await client.submit("paint it", pool=POOL)
    await gates[0].wait_reached()
    await asyncio.sleep(LONG_STEP_S)
    gates[0].open()
    await gates[1].wait_reached()
    return sid


async def test_the_submission_is_no_signal_so_a_run_does_not_look_in_the_stream_at_its_first_step(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """The session's creation, on the submitter's command channel, is heard like people's messages;
    it is what the run read when it took the session, so it must not make each step boundary ask the
    stream for people's records (a lookup per session the one-step bench paid)."""
    gates = (Gate(), Gate())
    read = tool_use_response("read_file", {"path": "none.txt"}, id="tu_1")
    with FakeMessagesAPI(responder=held_steps(gates, (read, read), text_response("done"))) as api:
        async with agent(settings, api, tmp_path, gates=gates) as worker:
            await until(lambda: hearing(worker), "the agent to hear people's channels", timeout=10)
            sid = await client.submit("paint it", pool=POOL)
            await gates[0].wait_reached()
            assert not worker._runs[sid].transcript.must_look()
            assert sid not in worker._heard
            gates[0].open()
            gates[1].open()
            assert (await client.wait(sid, timeout=20)).status == "completed"


@pytest.mark.parametrize("role", ["admin", "agent"])
async def test_a_steer_during_a_long_model_call_reaches_the_next_request_through_the_signal(
    client: agentbus.Client, settings: Settings, as_user: AsUser, tmp_path: Path, role: str
) -> None:
    """As an admin, and as an `agent` user (what agents run as under authentication)."""
    worker_settings = settings if role == "admin" else as_user("worker", "agent", pools=[POOL])
    gates = (Gate(), Gate())
    read = tool_use_response("read_file", {"path": "none.txt"}, id="tu_1")
    again = tool_use_response("read_file", {"path": "none.txt"}, id="tu_2")
    with FakeMessagesAPI(responder=held_steps(gates, (read, again), text_response("done, in blue"))) as api:
        async with agent(worker_settings, api, tmp_path, gates=gates) as worker:
            sid = await past_the_submission(client, worker, gates)
            await held_run(worker, sid)
            seq = await client.say(sid, "use the blue one")
            await asyncio.sleep(LONG_STEP_S)  # the model call goes on past the lead
            gates[1].open()
            state = await client.wait(sid, timeout=20)
        requests = [body for body, _ in api.requests]
    assert (state.status, state.result) == ("completed", "done, in blue")
    assert len(requests) == 3
    assert not any("use the blue one" in t for m in requests[1]["messages"] for t in texts(m))
    assert "[message from admin] use the blue one" in texts(requests[2]["messages"][-1])
    delivered = [r.event for r in await client.show(sid) if isinstance(r.event, MessageDelivered)]
    assert [(d.message_seq, d.step) for d in delivered] == [(seq, 3)]


async def test_a_cancel_during_a_long_model_call_ends_the_session_before_any_other_call_or_tool(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gates = (Gate(), Gate())
    read = tool_use_response("read_file", {"path": "none.txt"}, id="tu_1")
    write = tool_use_response("write_file", {"path": "after.txt", "content": "x"}, id="tu_2")
    with FakeMessagesAPI(responder=held_steps(gates, (read, write), text_response("went on after the cancel"))) as api:
        async with agent(settings, api, tmp_path, gates=gates) as worker:
            sid = await past_the_submission(client, worker, gates)
            await held_run(worker, sid)
            await client.cancel(sid, reason="wrong task")
            await asyncio.sleep(LONG_STEP_S)
            gates[1].open()
            state = await client.wait(sid, timeout=20)
            calls = len(api.requests)
    assert (state.status, state.reason) == ("cancelled", "cancelled by admin: wrong task")
    assert calls == 2, "the model was called again after the cancel"
    assert not (tmp_path / sid / "after.txt").exists(), "the cancelled step's tool ran"


# --- fan-out under authentication ------------------------------------------------------------------------


@asynccontextmanager
async def routing(settings: Settings) -> AsyncIterator[Router]:
    """A router on its own connection (as the settings' user), sending unrouted tasks to POOL."""
    bus = await Bus.connect(settings, name="test-router")
    router = Router(bus, RouteTable(default_pool=POOL))
    runner = asyncio.create_task(router.run())
    try:
        yield router
        assert not runner.done(), "the router stopped on its own"
    finally:
        await router.shutdown()
        await runner
        await bus.close()


@asynccontextmanager
async def evaluating(settings: Settings, api: FakeMessagesAPI, workdir: Path) -> AsyncIterator[Evaluator]:
    """An evaluator on its own connection (as the settings' user), grading with the fake API."""
    model = AnthropicModel(MODEL_ID, api_key="test", base_url=api.base_url, max_retries=0)
    bus = await Bus.connect(settings, name="test-evaluator")
    evaluator = Evaluator(bus, model, workdir=workdir)
    runner = asyncio.create_task(evaluator.run())
    try:
        yield evaluator
        assert not runner.done(), "the evaluator stopped on its own"
    finally:
        await evaluator.shutdown()
        await runner
        await model.aclose()
        await bus.close()


def _is_grader(request: Request) -> bool:
    system = request.get("system")
    return GRADER_SYSTEM[:40] in (system if isinstance(system, str) else json.dumps(system))


@pytest.mark.parametrize("ender", ["agent", "evaluator"])
async def test_a_fan_out_under_authentication_collects_both_siblings_and_the_parent_completes(
    client: agentbus.Client,
    settings: Settings,
    as_user: AsUser,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ender: str,
) -> None:
    """Whoever ends a sibling (the agent running it, or the evaluator grading it) tells the router,
    which collects the siblings into the parent. The router's periodic sweep, which would collect
    a fan-out nobody told it about, runs once at its start only: the notices alone must do it."""
    monkeypatch.setattr(router_module, "KEEP_S", 600.0)
    answers = itertools.count(1)

    def responder(request: Request) -> Request:
        if _is_grader(request):
            return text_response(json.dumps({"criteria": [{"criterion": "names a colour", "passed": True}]}))
        return text_response(f"opinion {next(answers)}: blue")

    criteria = ["names a colour"] if ender == "evaluator" else []
    operator = as_user("olga", "operator")
    with FakeMessagesAPI(responder=responder) as api:
        async with (
            routing(as_user("router", "service")),
            agent(as_user("worker", "agent", pools=[POOL]), api, tmp_path),
            evaluating(as_user("grader", "service"), api, tmp_path),
            agentbus.connect(settings=operator) as olga,
        ):
            sid = await olga.submit("which colour?", opinions=[POOL, POOL], criteria=criteria)
            state = await olga.wait(sid, timeout=20)
    assert (state.status, state.reason) == ("completed", "2 of 2 opinions completed")
    records = [r.event for r in await client.show(sid)]
    (aggregate,) = [e for e in records if isinstance(e, OpinionsAggregated)]
    children = [o.session_id for o in aggregate.results]
    assert children == [f"{sid}-o1", f"{sid}-o2"]
    assert sorted(o.result for o in aggregate.results) == ["opinion 1: blue", "opinion 2: blue"]
    assert {o.status for o in aggregate.results} == {"completed"}
    done = [e for e in records if isinstance(e, DelegationCompleted)]
    assert sorted((d.child_session, d.status) for d in done) == [(c, "completed") for c in children]
    for o in aggregate.results:
        assert o.result in state.result
    graded = sum(_is_grader(body) for body, _ in api.requests)
    assert graded == (2 if ender == "evaluator" else 0)


async def test_a_model_that_delegates_two_subtasks_under_authentication_gets_both_results_and_completes(
    client: agentbus.Client, as_user: AsUser, tmp_path: Path
) -> None:
    """The `delegate` tool (one subtask per call) run by an `agent` user: its children go to the
    pool's queue, not the router's, and each end queues the parent again."""

    def responder(request: Request) -> Request:
        prompt = texts(request["messages"][0])[0]
        if prompt.startswith("subtask "):
            return text_response(f"result of {prompt}")
        if turns(request) == 0:
            uses = [
                {"type": "tool_use", "id": f"tu_{x}", "name": "delegate", "input": {"prompt": f"subtask {x}"}}
                for x in ("a", "b")
            ]
            return {"content": uses, "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 5}}
        results = [b for b in request["messages"][-1]["content"] if b.get("type") == "tool_result"]
        return text_response(" + ".join(str(r["content"]) for r in results))

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(as_user("worker", "agent", pools=[POOL]), api, tmp_path):
            sid = await client.submit("split it", pool=POOL)
            state = await client.wait(sid, timeout=20)
    assert (state.status, state.result) == ("completed", "result of subtask a + result of subtask b")
    done = [r.event for r in await client.show(sid) if isinstance(r.event, DelegationCompleted)]
    assert sorted((d.tool_use_id, d.status) for d in done) == [("tu_a", "completed"), ("tu_b", "completed")]
    children = [await client.state(d.child_session) for d in done]
    assert {(c.parent_session, c.depth, c.status) for c in children} == {(sid, 1, "completed")}


async def test_a_gap_in_hearing_makes_the_next_step_look_even_after_hearing_resumed(client: agentbus.Client) -> None:
    """Messages said while the worker's subscription was down were heard by nobody: once it is up
    again, the next step boundary must still ask the stream (it used to trust the resumed hearing
    until the 10 s fallback). A look made during the gap covers only until then."""
    from agentbus.messages import HumanMessage
    from services.agent.transcript import Hearing, Transcript

    sid = await client.submit("paint it", pool=POOL)
    live = Hearing()
    live.set()
    transcript = Transcript(client.log, sid, live)
    await transcript.load()
    assert not transcript.must_look()

    live.clear()  # the subscription went down
    await client.say(sid, "use the blue one")
    live.set()  # and came back
    assert transcript.must_look()
    assert await transcript.catch_up()
    assert [r.event.text for r in transcript.records if isinstance(r.event, HumanMessage)] == ["use the blue one"]
    assert not transcript.must_look()

    live.clear()
    assert not await transcript.catch_up()  # a look during the gap
    await client.say(sid, "and the red one")
    live.set()
    assert transcript.must_look()
    assert await transcript.catch_up()


async def test_a_refusal_that_says_people_wrote_makes_the_next_step_look_until_a_look_succeeds(
    client: agentbus.Client,
) -> None:
    """A fence on people's channels refused the run's write (`Transcript.told`): the next step
    boundary asks the stream though no signal was heard, and a look that fails leaves it asking."""
    from agentbus.errors import NatsUnreachable
    from agentbus.messages import HumanMessage
    from services.agent.transcript import Hearing, Transcript

    sid = await client.submit("paint it", pool=POOL)
    live = Hearing()
    live.set()
    transcript = Transcript(client.log, sid, live)
    await transcript.load()
    await client.say(sid, "use the blue one")  # its signal lost: nothing tells the transcript
    assert not transcript.must_look()

    transcript.told()
    assert transcript.must_look()
    real = client.log.bus.last_subject_seq

    async def unreachable(*args: Any) -> int:
        raise NatsUnreachable(client.bus.settings.nats_url, "down for a moment")

    client.log.bus.last_subject_seq = unreachable  # type: ignore[method-assign]
    with pytest.raises(NatsUnreachable):
        await transcript.catch_up()
    client.log.bus.last_subject_seq = real  # type: ignore[method-assign]
    assert transcript.must_look()  # not looked after all
    assert await transcript.catch_up()
    assert [r.event.text for r in transcript.records if isinstance(r.event, HumanMessage)] == ["use the blue one"]
    assert not transcript.must_look()


async def test_the_transcript_epoch_changes_only_when_records_change_other_than_by_growing(
    client: agentbus.Client,
) -> None:
    """What a run folds of its records incrementally (`guards.Guards`) starts over exactly when
    the records changed before their end: read again, or an older record merged in late."""
    from agentbus.bus import PubAck
    from agentbus.messages import HumanMessage, Record, StatusChanged
    from services.agent.transcript import Transcript

    sid = await client.submit("paint it", pool=POOL)
    transcript = Transcript(client.log, sid)
    await transcript.load()
    loaded, last = transcript.epoch, transcript.records[-1].seq
    note = StatusChanged(id="s", status="running")
    transcript.appended(PubAck("S", last + 10, False), note)
    said = HumanMessage(id="h", text="a", author="x")
    transcript.merge([Record(seq=last + 20, session_id=sid, channel="input", event=said)])
    assert transcript.epoch == loaded  # grown at the end
    transcript.merge([Record(seq=last + 5, session_id=sid, channel="input", event=said)])
    assert transcript.epoch == loaded + 1  # an older one, before records already there
    assert [r.seq for r in transcript.records][-3:] == [last + 5, last + 10, last + 20]
    await transcript.load()
    assert transcript.epoch == loaded + 2
