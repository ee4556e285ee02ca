"""The maker/checker loop: checks and criteria graded apart from the agent, critique sent back, rounds bounded."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import RevisionRequested, SessionEnded, VerdictRecorded, to_builtins
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.agent.worker import AgentConfig, AgentWorker
from services.evaluator.evaluator import Evaluator
from services.evaluator.grading import GRADER_SYSTEM

FIXTURES = Path(__file__).parent / "fixtures"
Responder = Callable[[dict[str, Any]], dict[str, Any]]


def _texts(request: dict[str, Any]) -> str:
    return json.dumps(request["messages"])


def _is_grader(request: dict[str, Any]) -> bool:
    system = request.get("system")
    text = system if isinstance(system, str) else json.dumps(system)
    return GRADER_SYSTEM[:40] in text


@asynccontextmanager
async def _system(settings: Settings, tmp_path: Path, responder: Responder) -> AsyncIterator[FakeMessagesAPI]:
    """An agent (pool p) and an evaluator, both on the real SDK against one fake API."""
    with FakeMessagesAPI(responder=responder) as api:
        model = AnthropicModel("claude-sonnet-4-6", api_key="test", base_url=api.base_url, max_retries=0)
        bus_a, bus_e = await Bus.connect(settings), await Bus.connect(settings)
        worker = AgentWorker(bus_a, AgentConfig(pool="p", model=model.name, workdir=tmp_path), model)
        evaluator = Evaluator(bus_e, model, workdir=tmp_path)
        tasks = [asyncio.create_task(worker.run()), asyncio.create_task(evaluator.run())]
        try:
            yield api
        finally:
            await worker.shutdown()
            await evaluator.shutdown()
            await asyncio.gather(*tasks)
            await model.aclose()
            await bus_a.close()
            await bus_e.close()


async def _record_fixture(client: agentbus.Client, sid: str, name: str) -> None:
    """With AGENTBUS_RECORD_FIXTURES=1, keep this run's log as a replay fixture."""
    if os.environ.get("AGENTBUS_RECORD_FIXTURES") != "1":
        return
    FIXTURES.mkdir(exist_ok=True)
    lines = [json.dumps(to_builtins(r.event)) for r in await client.show(sid)]
    (FIXTURES / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


async def test_a_check_that_fails_in_round_one_and_passes_in_round_two_completes_after_two_rounds(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def agent(request: dict[str, Any]) -> dict[str, Any]:
        text = _texts(request)
        if "tool_result" in text:
            return text_response("done.txt is written")
        if "sent your result back" in text:
            return tool_use_response("write_file", {"path": "done.txt", "content": "ok"})
        return text_response("all done (I did not write the file)")

    async with _system(settings, tmp_path, agent) as api:
        sid = await client.submit("make done.txt", pool="p", checks=["cat done.txt"], max_rounds=3)
        state = await client.wait(sid, timeout=30)
    assert state.status == "completed", state.reason
    assert state.result == "done.txt is written"
    records = await client.show(sid)
    verdicts = [r.event for r in records if isinstance(r.event, VerdictRecorded)]
    assert [(v.round, v.verdict) for v in verdicts] == [(1, "needs_revision"), (2, "satisfied")]
    second_round_first_request = next(b for b, _ in api.requests if "sent your result back" in _texts(b))
    critique = _texts(second_round_first_request)
    assert "cat done.txt" in critique
    assert "No such file or directory" in critique
    await _record_fixture(client, sid, "check_fails_then_passes")


async def test_a_session_that_never_satisfies_its_criteria_fails_with_max_rounds(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if _is_grader(request):
            return text_response(
                json.dumps({"criteria": [{"criterion": "mentions NATS", "passed": False, "critique": "no NATS"}]})
            )
        return text_response("a poem about rabbits")

    async with _system(settings, tmp_path, responder):
        sid = await client.submit("a poem", pool="p", criteria=["mentions NATS"], max_rounds=2)
        state = await client.wait(sid, timeout=30)
    assert state.status == "failed"
    assert state.reason == "max_rounds"
    verdicts = [r.event for r in await client.show(sid) if isinstance(r.event, VerdictRecorded)]
    assert [v.verdict for v in verdicts] == ["needs_revision", "needs_revision"]
    await _record_fixture(client, sid, "never_satisfied")


async def test_the_grader_sees_task_criteria_and_output_but_never_the_agents_reasoning_or_tools(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if _is_grader(request):
            return text_response(json.dumps({"criteria": [{"criterion": "is short", "passed": True, "score": 1}]}))
        if "tool_result" in _texts(request):
            return text_response("FINAL-ANSWER-42")
        return tool_use_response(
            "write_file", {"path": "notes.txt", "content": "TOOL-INPUT-SECRET"}, text="SECRET-REASONING-abc"
        )

    async with _system(settings, tmp_path, responder) as api:
        sid = await client.submit("answer briefly", pool="p", criteria=["is short"])
        state = await client.wait(sid, timeout=30)
    assert state.status == "completed", state.reason
    grader_requests = [raw for (body, _), raw in zip(api.requests, api.raw_bodies, strict=True) if _is_grader(body)]
    assert len(grader_requests) == 1
    seen = grader_requests[0].decode()
    assert "FINAL-ANSWER-42" in seen and "answer briefly" in seen and "is short" in seen
    for leaked in ("SECRET-REASONING-abc", "TOOL-INPUT-SECRET", "write_file", "tool_use", "tool_result"):
        assert leaked not in seen, f"the grader saw {leaked}"
    assert not json.loads(grader_requests[0]).get("tools")  # the grader can touch nothing
    await _record_fixture(client, sid, "criteria_satisfied")


async def test_two_failed_rounds_on_the_same_check_start_the_next_round_afresh(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def agent(request: dict[str, Any]) -> dict[str, Any]:
        return text_response("still not writing the file")

    async with _system(settings, tmp_path, agent) as api:
        sid = await client.submit("make done.txt", pool="p", checks=["test -f done.txt"], max_rounds=3)
        state = await client.wait(sid, timeout=30)
    assert state.status == "failed" and state.reason == "max_rounds"
    revisions = [r.event for r in await client.show(sid) if isinstance(r.event, RevisionRequested)]
    assert [(r.round, r.fresh_start) for r in revisions] == [(2, False), (3, True)]
    third = api.requests[-1][0]
    assert [m["role"] for m in third["messages"]] == ["user"]  # the old conversation is gone
    assert "Round 1" in _texts(third) and "Round 2" in _texts(third)


async def test_a_result_waiting_for_grading_survives_until_an_evaluator_starts(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    with FakeMessagesAPI(responder=lambda _: text_response("fine")) as api:
        model = AnthropicModel("claude-sonnet-4-6", api_key="test", base_url=api.base_url, max_retries=0)
        bus = await Bus.connect(settings)
        worker = AgentWorker(bus, AgentConfig(pool="p", model=model.name, workdir=tmp_path), model)
        runner = asyncio.create_task(worker.run())
        sid = await client.submit("x", pool="p", checks=["true"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (await client.state(sid)).status != "evaluating":
            assert loop.time() < deadline, "the agent never handed the result to the evaluator"
            await asyncio.sleep(0.05)
        await worker.shutdown()
        await runner
        evaluator = Evaluator(bus, None)
        erunner = asyncio.create_task(evaluator.run())
        try:
            state = await client.wait(sid, timeout=15)
        finally:
            await evaluator.shutdown()
            await erunner
            await model.aclose()
            await bus.close()
    assert state.status == "completed"


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.jsonl")))
def test_recorded_sessions_replay_to_the_same_evaluator_and_router_decisions(name: str) -> None:
    """A change in routing or grading policy shows up here as a diff, not as a surprise in production."""
    from agentbus.messages import Routed, SessionCreated, decode_event
    from services.evaluator.policy import decide
    from services.router.routes import RouteTable

    events = [decode_event(line.encode()) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    created = next(e for e in events if isinstance(e, SessionCreated))
    routed = next(e for e in events if isinstance(e, Routed))
    decision = RouteTable().choose(created.task)
    assert (decision.pool, decision.rule) == (routed.pool, routed.rule)
    verdicts: list[VerdictRecorded] = []
    for i, event in enumerate(events):
        if not isinstance(event, VerdictRecorded):
            continue
        verdicts.append(event)
        nxt = decide(created.task, verdicts)
        after = next(e for e in events[i + 1 :] if isinstance(e, RevisionRequested | SessionEnded))
        if nxt.action == "revise":
            assert isinstance(after, RevisionRequested)
            assert (after.round, after.fresh_start, after.critique) == (event.round + 1, nxt.fresh_start, nxt.critique)
        else:
            assert isinstance(after, SessionEnded)
            assert after.status == ("completed" if nxt.action == "complete" else "failed")
            assert after.reason == (nxt.reason or "satisfied")


async def test_a_malformed_evaluation_request_is_recorded_in_its_session_and_dropped(
    client: agentbus.Client, settings: Settings
) -> None:
    from agentbus.messages import InputRejected

    sid = await client.submit("x", pool="nobody", checks=["true"])
    bad = json.dumps({"session_id": sid, "round": "two"}).encode()
    await client.bus.publish(client.bus.ns.evaluations(), bad, msg_id="bad-eval")
    bus = await Bus.connect(settings)
    evaluator = Evaluator(bus, None)
    runner = asyncio.create_task(evaluator.run())
    try:

        async def rejected() -> list[InputRejected]:
            return [r.event for r in await client.show(sid) if isinstance(r.event, InputRejected)]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not (found := await rejected()):
            assert loop.time() < deadline, "the evaluator never recorded the bad request"
            await asyncio.sleep(0.05)
    finally:
        await evaluator.shutdown()
        await runner
        await bus.close()
    assert "malformed work item" in found[0].reason
    assert (await client.bus.consumer_backlog(client.bus.ns.evaluator_consumer())) == (0, 0)


def test_a_failed_check_that_printed_nothing_says_so_instead_of_ending_on_output() -> None:
    from agentbus.messages import CheckResult
    from services.evaluator.policy import critique_of

    silent = critique_of((), (CheckResult(command="test -s x", passed=False, exit_code=1, output=""),))
    loud = critique_of((), (CheckResult(command="cat x", passed=False, exit_code=1, output="no such file\n"),))
    assert silent.splitlines()[-1] == "- check `test -s x` failed (exit code 1). It printed nothing."
    assert loud.splitlines()[-2:] == ["- check `cat x` failed (exit code 1). Output:", "no such file"]
