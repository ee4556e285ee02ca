"""Human control: steer, follow-up and interrupt with receipts; approvals; parking; the inbox.

Real nats-server, the real anthropic SDK against the fake Messages API, agents in process
(and as real OS processes where one is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.inbox import InboxItem
from agentbus.messages import (
    ApprovalDecided,
    ApprovalRequested,
    Budget,
    MessageDelivered,
    ModelResponded,
    QuestionAsked,
    SessionClaimed,
    SessionEnded,
    SessionPaused,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
)
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.helpers import POOL, Gate, agent, until
from tests.test_agent import agent_process

pytestmark = pytest.mark.timeout(60)
Request = dict[str, Any]
E = TypeVar("E")


def turns(request: Request) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "assistant")


def bodies(api: FakeMessagesAPI) -> list[Request]:
    return [body for body, _ in api.requests]


def texts(message: dict[str, Any]) -> list[str]:
    return [b.get("text", "") for b in message["content"] if b.get("type") == "text"]


async def events(client: agentbus.Client, sid: str, kind: type[E]) -> list[E]:
    return [r.event for r in await client.show(sid) if isinstance(r.event, kind)]


async def status_is(client: agentbus.Client, sid: str, *statuses: str) -> bool:
    return (await client.state(sid)).status in statuses


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# --- the three verbs ---------------------------------------------------------------------------------


async def test_a_steer_reaches_the_next_request_and_its_receipt_names_that_step(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            gate.hold()
            return tool_use_response("read_file", {"path": "none.txt"}, id="tu_1")
        return text_response("done")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("x", pool=POOL)
            await gate.wait_reached()
            seq = await client.say(sid, "use the blue one")
            gate.open()
            receipt = await client.wait_delivered(sid, seq, timeout=20)
            assert (await client.wait(sid, timeout=20)).status == "completed"
        requests = bodies(api)
    assert receipt.step == 2 and receipt.message_seq == seq
    assert "[message from admin] use the blue one" in texts(requests[1]["messages"][-1])


async def test_a_follow_up_waits_for_the_end_of_the_turn_and_the_session_goes_on_with_it(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> Request:
        n = turns(request)
        if n == 0:
            gate.hold()
            return tool_use_response("read_file", {"path": "none.txt"}, id="tu_1")
        return text_response("first answer" if n == 1 else "second answer")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("x", pool=POOL)
            await gate.wait_reached()
            seq = await client.say(sid, "then also do B", queue=True)
            gate.open()
            state = await client.wait(sid, timeout=20)
        requests = bodies(api)
    assert state.status == "completed" and state.result == "second answer"
    assert len(requests) == 3
    assert not any("also do B" in t for m in requests[1]["messages"] for t in texts(m))  # not mid-turn
    last = requests[2]["messages"]
    assert texts(last[-2]) == ["first answer"] and texts(last[-1]) == ["[message from admin] then also do B"]
    delivered = await events(client, sid, MessageDelivered)
    assert [(d.message_seq, d.step) for d in delivered] == [(seq, 3)]


async def test_a_follow_up_on_a_completed_session_reopens_it_with_the_whole_conversation(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.script([text_response("one"), text_response("two")])
        async with agent(settings, api, tmp_path):
            sid = await client.submit("count", pool=POOL)
            assert (await client.wait(sid, timeout=20)).result == "one"
            with pytest.raises(UsageError, match="say --queue"):
                await client.say(sid, "steering a finished session")
            await client.say(sid, "and the next one?", queue=True)
            state = await client.wait(sid, timeout=20)
        requests = bodies(api)
    assert (state.status, state.result, state.turn) == ("completed", "two", 2)
    assert [m["role"] for m in requests[1]["messages"]] == ["user", "assistant", "user"]
    assert texts(requests[1]["messages"][1]) == ["one"]
    assert [e.id for e in await events(client, sid, SessionEnded)] == ["ended", "ended-2"]


async def test_an_interrupt_aborts_the_model_call_keeps_what_it_said_and_goes_on_with_the_text(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.stall("I was about to rewrite everything")
        api.script([text_response("fine, only the header")])
        async with agent(settings, api, tmp_path):
            sid = await client.submit("improve the file", pool=POOL)
            await asyncio.to_thread(api.stalled.wait, 10)
            await client.interrupt(sid, "only touch the header")
            state = await client.wait(sid, timeout=20)
            await until(lambda: _disconnected(api), "the fake API to see the request closed")
        requests = bodies(api)
    assert state.status == "completed" and state.result == "fine, only the header"
    cut = (await events(client, sid, ModelResponded))[0]
    assert cut.stop_reason == "interrupted"
    arrived = "I was about to rewrite everything"[:16]  # the fake streams the first half, then stalls
    assert texts({"content": list(cut.content)}) == [arrived]
    last = requests[1]["messages"]
    assert texts(last[-2]) == [arrived]
    assert "[admin interrupted you] only touch the header" in texts(last[-1])


async def _disconnected(api: FakeMessagesAPI) -> bool:
    return api.disconnects == 1


async def test_an_interrupt_without_text_pauses_the_session_until_someone_speaks(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.stall("thinking out loud")
        api.script([text_response("going on as told")])
        async with agent(settings, api, tmp_path):
            sid = await client.submit("x", pool=POOL)
            await asyncio.to_thread(api.stalled.wait, 10)
            await client.interrupt(sid)
            await until(lambda: status_is(client, sid, "paused"), "the session to pause")
            paused = await client.state(sid)
            inbox = [i.session_id async for i in client.inbox()]
            await client.say(sid, "go on, but briefly")
            await until(lambda: status_is(client, sid, "completed"), "the session to go on and finish", timeout=20)
            state = await client.state(sid)
    assert paused.reason == "interrupted: by admin"
    assert inbox == [sid]
    assert state.status == "completed" and state.result == "going on as told"


def _sleepers(marker: str) -> list[int]:
    """Pids of processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"pytest" not in cmdline:
            found.append(int(pid))
    return found


async def test_an_interrupt_kills_the_running_tool_and_the_session_goes_on(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    marker = f"sleep 100.{os.getpid() % 1000}"
    with FakeMessagesAPI() as api:
        api.script(
            [
                tool_use_response("bash", {"command": f"{marker}; echo late > late.txt"}, id="tu_sleep"),
                text_response("skipped it"),
            ]
        )
        async with agent(settings, api, tmp_path, tools=("bash",)):
            sid = await client.submit("x", pool=POOL)
            await until(lambda: _started(client, sid), "the command to start")
            await until(lambda: _running(marker), "the sleep to run")
            await client.interrupt(sid, "skip that")
            state = await client.wait(sid, timeout=20)
            gone = not _sleepers(marker)
    assert state.status == "completed" and state.result == "skipped it"
    assert gone, "the interrupted command outlived its call"
    result = (await events(client, sid, ToolCallCompleted))[0]
    assert result.is_error and "interrupted by admin" in result.output
    assert not (tmp_path / sid / "late.txt").exists()


async def test_an_interrupt_whose_live_signal_was_missed_still_stops_the_running_tool(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent hears nobody live (its subscription down, being made again, or a signal lost): the
    running command is still interrupted, from the log, within seconds, not when it ends."""
    from services.agent.worker import AgentWorker

    async def deaf(self: AgentWorker) -> None:
        await asyncio.Event().wait()  # never subscribed: every signal is missed

    monkeypatch.setattr(AgentWorker, "_hear_people", deaf)
    marker = f"sleep 100.{os.getpid() % 1000 + 1}"
    with FakeMessagesAPI() as api:
        api.script(
            [
                tool_use_response("bash", {"command": f"{marker}; echo late > late.txt"}, id="tu_sleep"),
                text_response("skipped it"),
            ]
        )
        async with agent(settings, api, tmp_path, tools=("bash",)):
            sid = await client.submit("x", pool=POOL)
            await until(lambda: _started(client, sid), "the command to start")
            await until(lambda: _running(marker), "the sleep to run")
            await client.interrupt(sid, "skip that")
            state = await client.wait(sid, timeout=30)
            gone = not _sleepers(marker)
    assert state.status == "completed" and state.result == "skipped it"
    assert gone, "the interrupted command outlived its call"
    result = (await events(client, sid, ToolCallCompleted))[0]
    assert result.is_error and "interrupted by admin" in result.output


async def _started(client: agentbus.Client, sid: str) -> bool:
    return bool(await events(client, sid, ToolCallStarted))


async def _running(marker: str) -> bool:
    return bool(_sleepers(marker))


# --- approvals ---------------------------------------------------------------------------------------


def _write_then_done(request: Request) -> Request:
    if turns(request) == 0:
        return tool_use_response("write_file", {"path": "out.txt", "content": "hello"}, id="tu_w")
    result = next(
        b for m in request["messages"] for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"
    )
    return text_response(f"tool said: {result['content']}")


async def test_an_approved_call_runs_and_a_denied_one_tells_the_model_who_denied_it_and_why(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",)):
            yes = await client.submit("write it", pool=POOL)
            no = await client.submit("write it too", pool=POOL)
            for sid in (yes, no):
                await until(lambda sid=sid: status_is(client, sid, "awaiting_approval"), "the approval request")
            assert not (tmp_path / yes / "out.txt").exists()
            inbox = {i.session_id: i async for i in client.inbox()}
            await client.approve(yes)
            await client.approve(no, deny=True, reason="not in this repo")
            approved, denied = await client.wait(yes, timeout=20), await client.wait(no, timeout=20)
    assert set(inbox) == {yes, no}
    assert inbox[yes].command.startswith(f"agentbus approve {yes}")
    assert "write_file" in inbox[yes].question and "out.txt" in inbox[yes].question
    assert approved.result == "tool said: wrote 5 bytes to out.txt"
    assert (tmp_path / yes / "out.txt").read_text() == "hello"
    assert denied.result == "tool said: not run: denied by admin: not in this repo"
    assert not (tmp_path / no / "out.txt").exists()
    decided = await events(client, no, ApprovalDecided)
    assert [(d.approved, d.author) for d in decided] == [(False, "admin")]


async def test_approving_a_session_with_nothing_waiting_is_refused(client: agentbus.Client) -> None:
    sid = await client.submit("x", pool="nobody")
    with pytest.raises(UsageError, match="no tool call waiting"):
        await client.approve(sid)


@pytest.mark.parametrize("on_timeout", ["deny", "pause"])
async def test_an_approval_nobody_gives_times_out_as_the_pool_says(
    client: agentbus.Client, settings: Settings, tmp_path: Path, on_timeout: str
) -> None:
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(
            settings, api, tmp_path, approve=("write_file",), approval_timeout_s=0.5, on_approval_timeout=on_timeout
        ):
            sid = await client.submit("write it", pool=POOL)
            await until(lambda: status_is(client, sid, "completed", "paused"), "the timeout to act", timeout=20)
            state = await client.state(sid)
    assert not (tmp_path / sid / "out.txt").exists()
    if on_timeout == "deny":
        assert state.result == "tool said: not run: denied by timeout: nobody decided within 0.5s"
    else:
        assert state.status == "paused" and state.reason.startswith("approval_timeout")


@pytest.mark.timeout(90)
async def test_an_approval_survives_kill_9_of_the_agent_and_a_new_agent_goes_on_from_the_decision(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    def responder(request: Request) -> Request:
        if turns(request) == 0:
            return tool_use_response("bash", {"command": "echo ran >> side.txt"}, id="tu_b")
        return text_response("done")

    with FakeMessagesAPI(responder=responder) as api:
        first = agent_process(settings, api, tmp_path / "work", tmp_path / "first.log", extra=["--approve", "bash"])
        procs.append(first)
        sid = await client.submit("run it", pool=POOL)
        await until(lambda: status_is(client, sid, "awaiting_approval"), "the approval request", timeout=30)
        first.kill()
        first.wait(10)
        await client.approve(sid)  # decided while no agent runs
        second = agent_process(settings, api, tmp_path / "work", tmp_path / "second.log", extra=["--approve", "bash"])
        procs.append(second)
        state = await client.wait(sid, timeout=40)
    assert state.status == "completed", (tmp_path / "second.log").read_text()[-2000:]
    assert (tmp_path / "work" / sid / "side.txt").read_text() == "ran\n"  # once
    assert len(await events(client, sid, ApprovalRequested)) == 1


# --- waiting holds no slot ---------------------------------------------------------------------------


async def test_an_agent_with_one_slot_serves_others_while_a_session_waits_for_approval_or_a_subtask(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: Request) -> Request:
        prompt = json.dumps(request["messages"][0])
        if "delegating parent" in prompt:
            if turns(request) == 0:
                return tool_use_response("delegate", {"prompt": "the child part"}, id="tu_d")
            return text_response("parent done")
        if "needs approval" in prompt and turns(request) == 0:
            return tool_use_response("write_file", {"path": "a.txt", "content": "a"}, id="tu_a")
        return text_response("plain done")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, concurrency=1, approve=("write_file",)):
            waiting = await client.submit("needs approval", pool=POOL)
            await until(lambda: status_is(client, waiting, "awaiting_approval"), "the approval request")
            other = await client.submit("plain one", pool=POOL)
            assert (await client.wait(other, timeout=20)).status == "completed"
            parent = await client.submit("delegating parent", pool=POOL)  # its child needs the only slot
            assert (await client.wait(parent, timeout=20)).result == "parent done"
            await client.approve(waiting)
            assert (await client.wait(waiting, timeout=20)).status == "completed"


# --- the inbox ---------------------------------------------------------------------------------------


async def test_the_inbox_shows_exactly_the_sessions_that_need_a_person_and_follows_new_ones(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: Request) -> Request:
        prompt = json.dumps(request["messages"][0])
        if "ask" in prompt and turns(request) == 0:
            return tool_use_response("ask_human", {"question": "which colour?"}, id="tu_q")
        if "approve" in prompt and turns(request) == 0:
            return tool_use_response("write_file", {"path": "a.txt", "content": "a"}, id="tu_a")
        if "loop" in prompt:
            return tool_use_response("read_file", {"path": "a.txt"})
        return text_response("done")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",)):
            asks = await client.submit("ask me", pool=POOL)
            approves = await client.submit("approve me", pool=POOL)
            pauses = await client.submit("loop forever", pool=POOL, budget=Budget(max_steps=1))
            completes = await client.submit("just finish", pool=POOL)
            await client.wait(completes, timeout=20)
            await client.wait(pauses, timeout=20)
            await until(lambda: status_is(client, asks, "waiting"), "the question")
            await until(lambda: status_is(client, approves, "awaiting_approval"), "the approval request")
            listed = {i.session_id: i async for i in client.inbox()}
            follow = client.inbox(follow=True)
            first = [await anext(follow) for _ in range(3)]
            later = await client.submit("ask me again", pool=POOL)
            arrived = await _next_for(follow, later)
            await client.dismiss(pauses, note="seen")
            left = await _next_for(follow, pauses)
            await follow.aclose()  # type: ignore[attr-defined]
    assert set(listed) == {asks, approves, pauses}
    assert listed[asks].why == "asks: which colour?" and listed[asks].command == f'agentbus say {asks} "your answer"'
    assert listed[pauses].command == f"agentbus resume {pauses} --max-steps N"
    assert {i.session_id for i in first} == set(listed)
    assert arrived.present and arrived.status == "waiting"
    assert not left.present
    assert pauses not in {i.session_id async for i in client.inbox()}


async def _next_for(items: AsyncIterator[InboxItem], sid: str) -> InboxItem:
    started = time.monotonic()
    async with asyncio.timeout(20):
        async for item in items:
            if item.session_id == sid:
                print(f"inbox follow: {sid} after {time.monotonic() - started:.3f}s")  # a figure, not a check
                return item
    raise AssertionError("the follow ended")


async def test_an_approval_times_out_from_its_request_even_when_someone_steers_meanwhile(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """A message while the call waits wakes the session, which parks again with a timer of its own;
    the first timer still ends the wait at the request's time. (Measured from the latest park, each
    timer found a newer park, parked once more and set another timer: the wait never ended.)"""
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",), approval_timeout_s=3.0):
            sid = await client.submit("write it", pool=POOL)
            await until(lambda: status_is(client, sid, "awaiting_approval"), "the approval request")
            # a third of the way through the wait (the two timers' due seconds must differ, or the
            # second one's queued item is swallowed as a duplicate of the first's)
            await asyncio.sleep(1.0)
            await client.say(sid, "still there?")
            await until(lambda: status_is(client, sid, "completed"), "the timeout to act", timeout=30)
            state = await client.state(sid)
    parks = await events(client, sid, ToolCallParked)
    assert state.result == "tool said: not run: denied by timeout: nobody decided within 3s"
    assert len(parks) == 2 and parks[1].ts < parks[0].ts + 3.0  # parked again by the message, then timed out


# --- a lost ack ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _first_acks_lost(monkeypatch: pytest.MonkeyPatch, subject: str) -> Iterator[tuple[set[int], list[int]]]:
    """The first ack of each task on `subject` is lost (as with the connection, or the agent dying
    right after its last record): the server delivers the task again after its ack wait."""
    from agentbus.bus import Job

    lost: set[int] = set()
    redelivered: list[int] = []
    ack = Job.ack

    async def lossy(self: Job, *, sync: bool = True) -> None:
        if self.subject == subject and self.seq not in lost:
            lost.add(self.seq)
            return
        if self.subject == subject and self.attempt > 1:
            redelivered.append(self.seq)
        await ack(self, sync=sync)

    monkeypatch.setattr(Job, "ack", lossy)
    yield lost, redelivered


async def test_a_task_delivered_again_after_its_run_paused_changes_nothing(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost acks after a budget pause and an interrupt's pause: the tasks come back and are acked
    with nothing written (claimed again, the interrupted session went on by itself, and the
    budget-paused one looked like a run nobody ran). After a question's park the task claims and
    parks again, asking nothing twice."""

    def responder(request: Request) -> Request:
        prompt = json.dumps(request["messages"][0])
        if "ask" in prompt:
            return tool_use_response("ask_human", {"question": "which colour?"}, id="tu_q")
        return tool_use_response("read_file", {"path": "a.txt"})

    with (
        _first_acks_lost(monkeypatch, client.bus.ns.work(POOL)) as (lost, redelivered),
        FakeMessagesAPI(responder=responder) as api,
    ):
        async with agent(settings, api, tmp_path, ack_wait_s=1.0):
            asks = await client.submit("ask me", pool=POOL)
            pauses = await client.submit("loop", pool=POOL, budget=Budget(max_steps=1))
            await until(lambda: status_is(client, asks, "waiting"), "the question")
            await until(lambda: status_is(client, pauses, "paused"), "the budget pause")
            api.stall("thinking out loud")
            stops = await client.submit("stop me", pool=POOL)
            await asyncio.to_thread(api.stalled.wait, 10)
            await client.interrupt(stops)
            await until(lambda: status_is(client, stops, "paused"), "the interrupt's pause")
            await until(lambda: _all_back(lost, redelivered, 3), "the three tasks delivered again and acked")
            calls = len(api.requests)
            await client.resume(pauses, budget=Budget(max_steps=3))  # a budget pause is still one

    assert calls == 3  # one model call each: nothing ran again
    for sid in (pauses, stops):  # a pause stands: claimed once
        kinds = [type(r.event) for r in (await client.show(sid)) if r.seq <= await _before_resume(client, sid)]
        assert kinds.count(SessionClaimed) == 1, (sid, kinds)
    assert (await client.state(stops)).status == "paused"
    # a park is looked at again (what it waits for may have come before it was recorded): claimed
    # and parked anew, the question not asked twice
    assert (await client.state(asks)).status == "waiting"
    assert len(await events(client, asks, QuestionAsked)) == 1
    assert len(await events(client, asks, ToolCallParked)) == 2


async def _all_back(lost: set[int], redelivered: list[int], n: int) -> bool:
    return len(lost) == n and set(redelivered) == lost


async def _before_resume(client: agentbus.Client, sid: str) -> int:
    records = await client.show(sid)
    resumed = [r.seq for r in records if type(r.event).__name__ == "ResumeRequested"]
    return resumed[0] if resumed else records[-1].seq


async def test_a_hand_off_to_the_evaluator_cut_short_is_finished_by_the_task_delivered_again(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent records `evaluating` and dies before it queues the evaluation: the task, delivered
    again, queues it (once) instead of leaving the session evaluating for ever."""
    from agentbus.queues import WorkQueues
    from services.evaluator.evaluator import Evaluator

    enqueue = WorkQueues.enqueue
    cut: list[str] = []

    async def dies_once(self: WorkQueues, item: Any, to: str, **kwargs: Any) -> Any:
        if to == "evaluator" and not cut:
            cut.append(item.session_id)
            raise ConnectionError("the agent died here")
        return await enqueue(self, item, to, **kwargs)

    monkeypatch.setattr(WorkQueues, "enqueue", dies_once)
    with FakeMessagesAPI(responder=lambda request: text_response("wrote it")) as api:
        async with agent(settings, api, tmp_path, ack_wait_s=1.0):
            bus = await Bus.connect(settings)
            evaluator = Evaluator(bus, None, workdir=tmp_path)
            runner = asyncio.create_task(evaluator.run())
            try:
                sid = await client.submit("write it", pool=POOL, checks=["true"])
                state = await client.wait(sid, timeout=30)
            finally:
                await evaluator.shutdown()
                await runner
                await bus.close()

    assert cut == [sid]
    assert state.status == "completed" and state.result == "wrote it"
    assert len(api.requests) == 1  # the agent's one call; the check needs no model
    kinds = [type(r.event) for r in await client.show(sid)]
    assert kinds.count(SessionClaimed) == 1


async def test_an_approval_timer_cut_short_is_set_by_the_task_delivered_again(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent records the park for an approval and dies before it sets the timer: the task,
    delivered again, parks once more and sets one, so the approval still times out as the pool
    says (counted from the first park)."""
    from agentbus.queues import WorkQueues

    schedule = WorkQueues.schedule
    cut: list[str] = []

    async def dies_once(self: WorkQueues, timer: Any, **kwargs: Any) -> Any:
        if not cut:
            cut.append(timer.session_id)
            raise ConnectionError("the agent died here")
        return await schedule(self, timer, **kwargs)

    monkeypatch.setattr(WorkQueues, "schedule", dies_once)
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",), approval_timeout_s=1.0, ack_wait_s=1.0):
            sid = await client.submit("write it", pool=POOL)
            await until(lambda: status_is(client, sid, "completed"), "the timeout to act", timeout=30)
            state = await client.state(sid)
    assert cut == [sid]
    assert state.result == "tool said: not run: denied by timeout: nobody decided within 1s"
    assert len(await events(client, sid, ApprovalRequested)) == 1


async def test_an_approval_timed_out_into_a_pause_and_resumed_gets_a_whole_wait_again(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """After `resume` the call waits the pool's whole timeout again and, if nobody decides, pauses
    again (a second pause under the first one's id was dropped as a duplicate: the session then
    waited with no timer at all)."""
    with FakeMessagesAPI(responder=_write_then_done) as api:
        async with agent(settings, api, tmp_path, approve=("write_file",), approval_timeout_s=1.0,
                         on_approval_timeout="pause"):  # fmt: skip
            sid = await client.submit("write it", pool=POOL)
            await until(lambda: status_is(client, sid, "paused"), "the first timeout")
            await client.resume(sid)
            await until(lambda: _paused_times(client, sid, 2), "the second timeout", timeout=30)
            state = await client.state(sid)
    pauses = await events(client, sid, SessionPaused)
    resumed = [r for r in await client.show(sid) if type(r.event).__name__ == "ResumeRequested"]
    parks = await events(client, sid, ToolCallParked)
    assert state.status == "paused" and state.reason.startswith("approval_timeout")
    assert pauses[1].ts >= resumed[0].event.ts + 1.0  # a whole wait after the resume
    assert len(parks) == 2 and not (tmp_path / sid / "out.txt").exists()


async def _paused_times(client: agentbus.Client, sid: str, n: int) -> bool:
    return len(await events(client, sid, SessionPaused)) >= n and await status_is(client, sid, "paused")


async def test_a_run_started_by_an_answer_whose_model_call_fails_goes_on_when_its_task_comes_back(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    """The answer's wake-up claims the session, its model call fails (an overloaded API), and the
    task is given back: delivered again, it claims and goes on. (A wake-up for a session no longer
    parked was dropped as stale, and the session stayed 'running' with nobody running it.)"""

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            return tool_use_response("ask_human", {"question": "which colour?"}, id="tu_q")
        return text_response("blue it is")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, max_retries=0):
            sid = await client.submit("ask me", pool=POOL)
            await until(lambda: status_is(client, sid, "waiting"), "the question")
            api.fail(529)  # the next call, the woken run's
            await client.say(sid, "blue")
            state = await client.wait(sid, timeout=30)
    assert state.status == "completed" and state.result == "blue it is"
