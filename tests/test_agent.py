"""The agent worker end to end: a real nats-server, the real anthropic SDK against `FakeMessagesAPI`.

Nothing here is mocked. The worker runs in-process (or, for `kill -9`, as the real `agentbus agent`
command), the model is `AnthropicModel` over HTTP, and every assertion reads the session log back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    DelegationCompleted,
    DelegationRequested,
    InputRejected,
    ModelResponded,
    Record,
    SessionClaimed,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
    Usage,
    event_type,
)
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.helpers import MODEL_ID, POOL, Gate, agent, until

pytestmark = pytest.mark.timeout(30)

Request = dict[str, Any]
E = TypeVar("E")


# --- helpers ------------------------------------------------------------------------------------


async def events(client: agentbus.Client, sid: str, kind: type[E]) -> list[E]:
    return [r.event for r in await client.show(sid) if isinstance(r.event, kind)]


def kinds(records: list[Record]) -> list[str]:
    return [event_type(r.event) for r in records]


def turns(request: Request) -> int:
    """How many model replies the request already carries: 0 for a session's first call."""
    return sum(1 for m in request["messages"] if m["role"] == "assistant")


def first_text(request: Request) -> str:
    return json.dumps(request["messages"][0])


def last_user(request: Request) -> list[dict[str, Any]]:
    message = request["messages"][-1]
    assert message["role"] == "user"
    content: list[dict[str, Any]] = message["content"]
    return content


def tool_result(request: Request, tool_use_id: str) -> dict[str, Any]:
    """The tool_result block for `tool_use_id` in the request's last user turn."""
    found = [b for b in last_user(request) if b.get("type") == "tool_result" and b.get("tool_use_id") == tool_use_id]
    assert len(found) == 1, f"expected one tool_result for {tool_use_id} in {last_user(request)}"
    return found[0]


def bodies(api: FakeMessagesAPI) -> list[Request]:
    return [body for body, _ in api.requests]


async def _queue_empty(bus: Bus) -> bool:
    return await queued(bus) == 0


async def queued(bus: Bus) -> int:
    """Messages on the pool's queue not yet acked or terminated (waiting or delivered)."""
    return sum(await bus.consumer_backlog(bus.ns.pool_consumer(POOL)))


async def _drained(bus: Bus) -> bool:
    return await queued(bus) == 0


# --- 1. a multi-step tool session ------------------------------------------------------------------


async def test_a_write_then_read_session_completes_with_each_step_logged_once_and_its_usage(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    usages = [
        {"input_tokens": 100 * n, "output_tokens": 10 * n, "cache_creation_input_tokens": 7 * n,
         "cache_read_input_tokens": 3 * n}
        for n in (1, 2, 3)
    ]  # fmt: skip
    with FakeMessagesAPI() as api:
        api.script(
            [
                tool_use_response("write_file", {"path": "a.txt", "content": "hello"}, id="tu_1", usage=usages[0]),
                tool_use_response("read_file", {"path": "a.txt"}, id="tu_2", usage=usages[1]),
                text_response("a.txt says hello", usage=usages[2]),
            ]
        )
        async with agent(settings, api, tmp_path):
            sid = await client.submit("write a.txt, then read it back", pool=POOL)
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert state.result == "a.txt says hello"
    records = await client.show(sid)
    responded = [r.event for r in records if isinstance(r.event, ModelResponded)]
    assert [e.id for e in responded] == ["step-1", "step-2", "step-3"]
    assert [e.usage for e in responded] == [Usage(**u) for u in usages]
    assert state.usage == Usage(
        input_tokens=600, output_tokens=60, cache_creation_input_tokens=42, cache_read_input_tokens=18
    )
    assert all(e.cost_usd > 0 for e in responded)
    started = [r.event for r in records if isinstance(r.event, ToolCallStarted)]
    completed = [r.event for r in records if isinstance(r.event, ToolCallCompleted)]
    assert [(e.step, e.tool_use_id, e.rerun) for e in started] == [(1, "tu_1", False), (2, "tu_2", False)]
    assert [(e.tool_use_id, e.output, e.is_error) for e in completed] == [
        ("tu_1", "wrote 5 bytes to a.txt", False),
        ("tu_2", "hello", False),
    ]
    assert kinds(records).count("session_ended") == 1
    assert (tmp_path / sid / "a.txt").read_text() == "hello"
    assert len(requests) == 3
    assert tool_result(requests[1], "tu_1")["content"] == "wrote 5 bytes to a.txt"
    assert requests[1]["messages"][1]["content"][0]["id"] == "tu_1"  # the recorded call is replayed before it
    assert tool_result(requests[2], "tu_2")["content"] == "hello"


async def test_a_final_answer_and_the_end_go_out_together_and_are_stored_one_after_the_other(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.script([text_response("all done")])
        async with agent(settings, api, tmp_path) as worker:
            chained: list[object] = []
            real = worker.bus.publish_chained

            async def counted(*args: Any, **kwargs: Any) -> Any:
                chained.append(result := await real(*args, **kwargs))
                return result

            worker.bus.publish_chained = counted  # type: ignore[method-assign]
            await until(lambda: _hearing(worker), "the worker to hear people live")
            sid = await client.submit("say done", pool=POOL)
            state = await client.wait(sid, timeout=15)

    assert state.status == "completed" and state.result == "all done"
    records = await client.show(sid)
    assert kinds(records)[-2:] == ["model_responded", "session_ended"]
    assert records[-1].seq == records[-2].seq + 1  # nothing of the stream between them
    [(ack, after)] = chained  # type: ignore[misc]  # the bus's answer: both stored
    assert after is not None and (ack.seq, after.seq) == (records[-2].seq, records[-1].seq)


async def test_a_final_answer_whose_ends_ack_was_lost_ends_the_session_once_and_the_run_keeps_it(
    client: agentbus.Client, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeMessagesAPI() as api:
        api.script([text_response("all done")])
        async with agent(settings, api, tmp_path) as worker:
            real = worker.bus.ask_together

            dropped: list[object] = []

            async def end_unanswered(requests: Any, timeout: float) -> Any:
                answers = await real(requests, timeout)
                if len(requests) == 2 and "Nats-Expected-Last-Msg-Id" in requests[1][2]:
                    dropped.append(answers[1])
                    return [answers[0], TimeoutError("the end's ack was lost")]
                return answers

            worker.bus.ask_together = end_unanswered  # type: ignore[method-assign]
            await until(lambda: _hearing(worker), "the worker to hear people live")
            sid = await client.submit("say done", pool=POOL)
            state = await client.wait(sid, timeout=15)
            await until(lambda: _done(worker), "the run to finish")

    assert state.status == "completed" and state.result == "all done"
    assert kinds(await client.show(sid)).count("session_ended") == 1
    assert len(dropped) == 1  # the path under test was taken
    assert worker.served == 1  # the end was found as the run's own, not another's
    assert "owns it now" not in caplog.text


async def test_a_persons_message_the_run_did_not_hear_keeps_the_final_answers_end_out_and_is_answered(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the live signal for the message is lost (a slow subscriber, say): only the end's fence on
    # people's channels tells the run that someone wrote
    from services.agent.transcript import Transcript

    monkeypatch.setattr(Transcript, "nudge", lambda self, at=None: None)
    told: list[str] = []
    real_told = Transcript.told

    def counted_told(self: Transcript) -> None:
        told.append(self.sid)
        real_told(self)

    monkeypatch.setattr(Transcript, "told", counted_told)
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            gate.hold()
            return text_response("done")
        return text_response("done, and noted")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)) as worker:
            await until(lambda: _hearing(worker), "the worker to hear people live")
            sid = await client.submit("finish", pool=POOL)
            await gate.wait_reached()
            await client.say(sid, "one more thing")
            gate.open()
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed" and state.result == "done, and noted"
    assert told == [sid]  # the end's fence on people's channels refused it: the path under test
    assert len(requests) == 2 and "one more thing" in json.dumps(requests[1])
    records = kinds(await client.show(sid))
    assert records.count("session_ended") == 1 and records[-1] == "session_ended"


async def _done(worker: Any) -> bool:
    return bool(worker.served)


async def _hearing(worker: Any) -> bool:
    """The worker hears people's messages live: a run that reads its log now may take the chain."""
    return bool(worker._people_live.is_set())


# --- 2. kill -9 and resume in another process -------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Agent processes a test starts; whatever is still alive at the end is killed and reaped."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def agent_process(
    settings: Settings, api: FakeMessagesAPI, workdir: Path, output: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """The real `agentbus agent` command as its own OS process; its output goes to `output`."""
    cmd = [
        sys.executable, "-m", "agentbus.cli", "agent", "--pool", POOL, "--model", f"anthropic:{MODEL_ID}",
        "--nats", settings.nats_url, "--prefix", settings.prefix, "--tools", "read_file,write_file,bash",
        "--workdir", str(workdir), "--ack-wait", "2", *extra,
    ]  # fmt: skip
    env = {**os.environ, "ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test"}
    with output.open("ab") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(60)
async def test_an_agent_killed_mid_session_is_resumed_by_another_process_without_repeating_a_step(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            return tool_use_response("bash", {"command": "echo once >> side.txt"}, id="tu_side")
        gate.hold()  # the first agent dies in here, after step 1 is recorded and its tool ran
        return text_response("side.txt written once")

    logs = tmp_path / "logs"
    logs.mkdir()
    with FakeMessagesAPI(responder=responder) as api:
        try:
            procs.append(agent_process(settings, api, tmp_path, logs / "agent1.log"))
            sid = await client.submit("append a line to side.txt", pool=POOL)

            async def step_one_done() -> bool:
                return bool(await events(client, sid, ToolCallCompleted)) and len(api.requests) >= 2

            await until(step_one_done, "step 1's tool result and the second model request", timeout=20)
            await gate.wait_reached()
            procs[0].send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(procs[0].wait, 10) == -signal.SIGKILL
            assert not (await client.state(sid)).terminal

            procs.append(agent_process(settings, api, tmp_path, logs / "agent2.log"))
            gate.open()  # the dead agent's call is answered into a closed socket
            state = await client.wait(sid, timeout=25)
        finally:
            gate.open()
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert state.result == "side.txt written once"
    records = await client.show(sid)
    assert [e.step for e in await events(client, sid, ModelResponded)] == [1, 2]
    assert kinds(records).count("tool_call_started") == 1
    assert kinds(records).count("tool_call_completed") == 1
    assert kinds(records).count("session_ended") == 1
    claims = [r.event for r in records if isinstance(r.event, SessionClaimed)]
    assert len({c.worker for c in claims}) == 2, claims  # two processes worked on it
    assert [turns(r) for r in requests].count(0) == 1  # step 1 was asked of the model exactly once
    assert (tmp_path / sid / "side.txt").read_text() == "once\n"  # and its side effect happened once
    assert tool_result(requests[-1], "tu_side")["content"] == "(no output)"


# --- 3. model API errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after"), [(429, 0.01), (529, None)])
async def test_a_retryable_api_error_is_retried_and_the_session_completes(
    client: agentbus.Client, settings: Settings, tmp_path: Path, status: int, retry_after: float | None
) -> None:
    with FakeMessagesAPI() as api:
        api.fail(status, retry_after=retry_after)
        api.script([text_response("fine after all")])
        async with agent(settings, api, tmp_path):
            sid = await client.submit("x", pool=POOL)
            state = await client.wait(sid, timeout=15)
        assert len(api.requests) == 2
    assert state.status == "completed", state.reason
    assert state.result == "fine after all"
    assert len(await events(client, sid, ModelResponded)) == 1


async def test_a_400_fails_the_session_with_the_apis_message_and_is_not_retried(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI() as api:
        api.fail(400, message="messages.0.content: prompt is too long")
        async with agent(settings, api, tmp_path):
            sid = await client.submit("x", pool=POOL)
            state = await client.wait(sid, timeout=15)
            await until(lambda: _drained(client.bus), "the ack")  # settled for good, not back on the queue
        assert len(api.requests) == 1
    assert state.status == "failed"
    assert "prompt is too long" in state.reason
    assert "400" in state.reason
    assert await events(client, sid, ModelResponded) == []


# --- 4. steering: say, ask_human, cancel --------------------------------------------------------------


async def test_a_message_said_during_a_model_call_reaches_the_model_in_the_next_request(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            gate.hold()  # the test says something while this call is in flight
            return tool_use_response("write_file", {"path": "colour.txt", "content": "red"}, id="tu_c")
        return text_response("repainted")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("pick a colour", pool=POOL)
            await gate.wait_reached()
            await client.say(sid, "use blue", author="ann")
            gate.open()
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert len(requests) == 2
    assert "use blue" not in json.dumps(requests[0])
    second = last_user(requests[1])
    assert second[0]["type"] == "tool_result" and second[0]["tool_use_id"] == "tu_c"  # tool results come first
    # the sender is the authenticated user (the test's admin); "ann" only a display name beside it
    assert {"type": "text", "text": '[message from admin (as "ann")] use blue'} in [
        {k: v for k, v in b.items() if k != "cache_control"} for b in second
    ]


async def test_ask_human_waits_then_the_reply_becomes_the_tool_result_and_the_session_runs_on(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            return tool_use_response("ask_human", {"question": "which number?"}, id="tu_q")
        gate.hold()  # keep the session running while the test looks at its status
        return text_response("the number is 42")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("ask me for a number", pool=POOL)

            async def status(expected: str) -> bool:
                return (await client.state(sid)).status == expected

            await until(lambda: status("waiting"), "the session to wait for a human")
            assert len(api.requests) == 1
            await client.say(sid, "42", author="bob")
            await gate.wait_reached()
            await until(lambda: status("running"), "the session to run again after the answer")
            gate.open()
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert state.result == "the number is 42"
    assert len(requests) == 2
    answer = tool_result(requests[1], "tu_q")
    assert "42" in answer["content"] and not answer.get("is_error")
    assert len(last_user(requests[1])) == 1  # the reply is the tool result, not also a separate turn
    # waiting holds no slot: the call parks the session, and the answer queues it again
    parked = await events(client, sid, ToolCallParked)
    assert [(p.tool_use_id, p.waiting_for) for p in parked] == [("tu_q", "answer")]
    assert len(await events(client, sid, SessionClaimed)) == 2


async def test_cancel_ends_a_session_waiting_for_a_human_as_cancelled(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: Request) -> dict[str, Any]:
        return tool_use_response("ask_human", {"question": "shall I go on?"}, id="tu_q")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path):
            sid = await client.submit("x", pool=POOL)
            await until(lambda: _status_is(client, sid, "waiting"), "the session to wait for a human")
            await client.cancel(sid, author="carol", reason="not needed")
            state = await client.wait(sid, timeout=15)
            await until(lambda: _drained(client.bus), "the ack")  # the end is recorded before the ack
        assert len(api.requests) == 1
    assert state.status == "cancelled"
    assert "carol" in state.reason and "not needed" in state.reason
    completed = await events(client, sid, ToolCallCompleted)
    assert len(completed) == 1 and completed[0].is_error  # the question was answered by the cancel


async def test_cancel_between_steps_ends_the_session_before_the_next_tool_runs(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        gate.hold()
        return tool_use_response("write_file", {"path": "never.txt", "content": "x"}, id="tu_w")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            sid = await client.submit("x", pool=POOL)
            await gate.wait_reached()
            await client.cancel(sid, author="dave")
            gate.open()
            state = await client.wait(sid, timeout=15)
        assert len(api.requests) == 1
    assert state.status == "cancelled"
    assert "dave" in state.reason
    records = await client.show(sid)
    assert kinds(records).count("model_responded") == 1  # the step in flight is still recorded
    assert "tool_call_started" not in kinds(records)
    assert not (tmp_path / sid / "never.txt").exists()


async def _status_is(client: agentbus.Client, sid: str, status: str) -> bool:
    return (await client.state(sid)).status == status


# --- 5. bad input on the work queue ----------------------------------------------------------------


async def test_malformed_tasks_are_rejected_on_record_and_the_agent_keeps_serving(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    victim = await client.submit("a session queued elsewhere", pool="elsewhere")
    work = client.bus.ns.work(POOL)
    with FakeMessagesAPI() as api:
        api.script([text_response("served")])
        async with agent(settings, api, tmp_path):
            await client.bus.publish(work, b"\xff\x00 not json at all", msg_id="garbage-1")
            await client.bus.publish(work, json.dumps({"session_id": victim, "reason": 5}).encode(), msg_id="bad-2")
            rejected = await until(lambda: events(client, victim, InputRejected), "the input_rejected event")
            sid = await client.submit("a good task", pool=POOL)
            state = await client.wait(sid, timeout=15)
            # both bad messages terminated, not left to come back (the good one is acked just after its end)
            await until(lambda: _queue_empty(client.bus), "an empty queue")
        assert len(api.requests) == 1  # nothing was asked of the model for the bad ones
    assert state.status == "completed" and state.result == "served"
    assert len(rejected) == 1
    assert "malformed work item" in rejected[0].reason and rejected[0].source == work
    victim_state = await client.state(victim)
    assert victim_state.status == "queued"  # the rejection is on record; the session itself is untouched


# --- 6. delegation ---------------------------------------------------------------------------------


async def test_a_delegated_child_session_runs_and_its_result_is_the_parents_tool_result(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: Request) -> dict[str, Any]:
        if "CHILD:" in first_text(request):
            return text_response("child computed 7")
        if turns(request) == 0:
            return tool_use_response("delegate", {"prompt": "CHILD: compute 3 + 4", "pool": POOL}, id="tu_d")
        return text_response("parent reports: " + tool_result(request, "tu_d")["content"])

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, concurrency=2):
            sid = await client.submit("PARENT: find out 3 + 4", pool=POOL)
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert state.result == "parent reports: child computed 7"
    assert len(state.children) == 1
    child = await client.state(state.children[0])
    assert (child.parent_session, child.depth, child.status, child.result) == (sid, 1, "completed", "child computed 7")
    parent_second = [r for r in requests if "PARENT:" in first_text(r) and turns(r) == 1]
    assert len(parent_second) == 1
    result = tool_result(parent_second[0], "tu_d")
    assert "child computed 7" in result["content"] and not result.get("is_error")
    assert len(await events(client, sid, DelegationRequested)) == 1
    done = await events(client, sid, DelegationCompleted)
    assert [(d.child_session, d.status) for d in done] == [(child.session_id, "completed")]
    assert len(requests) == 3  # parent, child, parent


async def test_delegation_past_the_depth_limit_is_an_error_result_for_the_model_not_a_hang(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            return tool_use_response("delegate", {"prompt": "CHILD: sub", "pool": POOL}, id="tu_d")
        return text_response("did it myself")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, concurrency=2, max_depth=0):
            sid = await client.submit("PARENT", pool=POOL)
            state = await client.wait(sid, timeout=15)
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert len(requests) == 2 and not any("CHILD:" in first_text(r) for r in requests)
    result = tool_result(requests[1], "tu_d")
    assert result["is_error"] is True
    assert "depth limit" in result["content"]
    assert state.children == ()


# --- 7. drain ------------------------------------------------------------------------------------


async def test_a_draining_agent_records_its_step_and_returns_the_task_for_another_to_finish(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def responder(request: Request) -> dict[str, Any]:
        step = turns(request) + 1
        if step == 1:
            return tool_use_response("write_file", {"path": "f.txt", "content": "one"}, id="tu_1")
        if step == 2:
            gate.hold()
            return tool_use_response("read_file", {"path": "f.txt"}, id="tu_2")
        return text_response("f.txt says one")

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, gates=(gate,), worker_id="first") as first:
            sid = await client.submit("write then read f.txt", pool=POOL)
            await gate.wait_reached()
            draining = asyncio.create_task(first.shutdown())
            gate.open()
            await asyncio.wait_for(draining, 10)  # returns once the step in flight is recorded and handed back
            records = await client.show(sid)
            assert [e.step for e in await events(client, sid, ModelResponded)] == [1, 2]
            assert kinds(records).count("tool_call_completed") == 1  # step 2's tool is left for the next agent
            assert "session_ended" not in kinds(records)
            assert await queued(client.bus) == 1  # not acked, not terminated: back on the queue
        assert len(api.requests) == 2

        async with agent(settings, api, tmp_path, worker_id="second"):
            state = await client.wait(sid, timeout=15)
            await until(lambda: _drained(client.bus), "the ack")  # the end is recorded before the ack
        requests = bodies(api)

    assert state.status == "completed", state.reason
    assert state.result == "f.txt says one"
    assert [e.step for e in await events(client, sid, ModelResponded)] == [1, 2, 3]
    assert [e.tool_use_id for e in await events(client, sid, ToolCallStarted)] == ["tu_1", "tu_2"]
    assert [e.tool_use_id for e in await events(client, sid, ToolCallCompleted)] == ["tu_1", "tu_2"]
    assert [turns(r) for r in requests] == [0, 1, 2]  # no model call was repeated
    claims = [(c.worker, c.attempt) for c in await events(client, sid, SessionClaimed)]
    assert claims == [("first", 1), ("second", 2)]  # the same queue message, redelivered once


async def test_a_session_waiting_for_a_human_outlives_its_agent_and_the_answer_wakes_the_next_one(
    client: agentbus.Client, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def responder(request: Request) -> dict[str, Any]:
        if turns(request) == 0:
            return tool_use_response("ask_human", {"question": "colour?"}, id="tu_q")
        return text_response("going with " + tool_result(request, "tu_q")["content"])

    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, tmp_path, worker_id="first", max_deliver=2) as first:
            sid = await client.submit("ask for a colour", pool=POOL)
            await until(lambda: _status_is(client, sid, "waiting"), "the session to wait for a human")
            await until(lambda: _drained(client.bus), "the ack")  # parked: it holds no queue message and no slot
            await asyncio.wait_for(first.shutdown(), 10)
            assert not (await client.state(sid)).terminal
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a drain is not a failure
        await client.say(sid, "green", author="erin")  # answered while no agent runs

        async with agent(settings, api, tmp_path, worker_id="second", max_deliver=2):
            state = await client.wait(sid, timeout=15)
        assert len(api.requests) == 2

    assert state.status == "completed", state.reason
    assert state.result == 'going with [message from admin (as "erin")] green'
    claims = [c.worker for c in await events(client, sid, SessionClaimed)]
    assert claims == ["first", "second"]
    started = await events(client, sid, ToolCallStarted)
    assert [s.rerun for s in started] == [False]  # the parked call picks up where it stopped
    assert len(await events(client, sid, ToolCallCompleted)) == 1


async def _claimed_by(client: agentbus.Client, sid: str, worker: str) -> bool:
    return any(c.worker == worker for c in await events(client, sid, SessionClaimed))


def test_the_agent_process_hands_serve_the_heap_freeze(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`agentbus agent` hands `serve` the heap freeze, to call once the worker is made."""
    from click.testing import CliRunner

    import services.agent.cli as agent_cli
    from agentbus.cli import main
    from agentbus.service import freeze_heap
    from services.agent.worker import AgentConfig

    handed: list[object] = []

    async def serve_spy(bus: Bus, config: AgentConfig, stop: asyncio.Event, **kwargs: object) -> None:
        handed.append(kwargs.get("started"))

    script = tmp_path / "script.json"
    script.write_text(json.dumps({"responses": [{"content": [{"type": "text", "text": "ok"}]}]}))
    monkeypatch.setattr(agent_cli, "serve", serve_spy)
    args = ["agent", "--pool", POOL, "--model", f"scripted:{script}", "--nats", settings.nats_url,
            "--prefix", settings.prefix]  # fmt: skip
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert handed == [freeze_heap]


async def test_serve_calls_started_once(settings: Settings, tmp_path: Path) -> None:
    from agentbus.models import ScriptedModel
    from services.agent.worker import AgentConfig, serve

    script = tmp_path / "script.json"
    script.write_text(json.dumps({"responses": [{"content": [{"type": "text", "text": "ok"}]}]}))
    model, stop = ScriptedModel(script), asyncio.Event()
    calls: list[int] = []

    async with await Bus.connect(settings) as bus:

        def started() -> None:
            calls.append(1)
            stop.set()  # and the worker drains at once

        config = AgentConfig(pool=POOL, model=model.name, workdir=tmp_path / "work")
        await asyncio.wait_for(serve(bus, config, stop, model=model, started=started), 30)

    assert calls == [1]


def test_an_agent_without_mcp_servers_never_imports_the_mcp_sdk(settings: Settings, tmp_path: Path) -> None:
    """The MCP SDK is about half a second of an agent's start (and half its memory after import):
    only a pool with `--mcp` servers pays for it. A worker is made and serves for a moment, in a
    process of its own."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"responses": []}))
    program = f"""
import asyncio, json, sys
from pathlib import Path
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.models import ScriptedModel
from services.agent.worker import AgentConfig, serve

async def main():
    settings = Settings(nats_url={settings.nats_url!r}, prefix={settings.prefix!r}, creds={settings.creds!r})
    model = ScriptedModel(Path({str(script)!r}))
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.0, stop.set)
    async with await Bus.connect(settings) as bus:
        config = AgentConfig(pool={POOL!r}, model=model.name, workdir=Path({str(tmp_path / "work")!r}))
        await serve(bus, config, stop, model=model)
    print(json.dumps([m for m in ("mcp", "mcp_types") if m in sys.modules]))

asyncio.run(main())
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout.splitlines()[-1]) == []
