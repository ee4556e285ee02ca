"""Runaway control: every budget pauses with its reason and figures, resume continues, children inherit what is left."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import Budget, BudgetExceeded, SessionCreated
from agentbus.testing import text_response, tool_use_response
from tests.helpers import agent_with_fake

Responder = Callable[[dict[str, Any]], dict[str, Any]]


def progressing(finish_after: int | None = None, usage: dict[str, int] | None = None) -> Responder:
    """A model that makes progress: a new tool call each turn, done after `finish_after` turns."""

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        turn = sum(1 for m in request["messages"] if m["role"] == "assistant") + 1
        if finish_after is not None and turn > finish_after:
            return text_response("finished", usage=usage)
        return tool_use_response("write_file", {"path": f"f{turn}.txt", "content": str(turn)}, usage=usage)

    return respond


async def _paused(client: agentbus.Client, sid: str) -> BudgetExceeded:
    state = await client.wait(sid, timeout=20)
    assert state.status == "paused", (state.status, state.reason)
    return [r.event for r in await client.show(sid) if isinstance(r.event, BudgetExceeded)][-1]


async def test_max_steps_pauses_with_the_figures_and_resume_with_a_higher_limit_continues(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path, progressing(finish_after=3)) as (api, _):
        sid = await client.submit("x", pool="p", budget=Budget(max_steps=2))
        paused = await _paused(client, sid)
        assert (paused.limit, paused.detail) == ("max_steps", "2 of 2 model calls")
        assert len(api.requests) == 2  # checked before the call: the third never went out
        await client.resume(sid, budget=Budget(max_steps=10))
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed" and state.steps == 4


async def test_a_token_ceiling_counts_cached_input_too(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10}
    async with agent_with_fake(settings, tmp_path, progressing(usage=usage)) as (api, _):
        sid = await client.submit("x", pool="p", budget=Budget(max_tokens=100))
        paused = await _paused(client, sid)
    assert paused.limit == "max_tokens"
    assert paused.detail.startswith("120 of 100 tokens")  # 2 calls x 60, of which 40 are cache tokens each
    assert len(api.requests) == 2


async def test_a_dollar_ceiling_prices_cache_tokens_at_their_own_rates(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    # claude-sonnet-4-6: $3/M input, $15/M output, $3.75/M cache write, $0.30/M cache read.
    usage = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 1_000_000}
    async with agent_with_fake(settings, tmp_path, progressing(usage=usage)):
        sid = await client.submit("x", pool="p", budget=Budget(max_usd=0.5))
        paused = await _paused(client, sid)
    state = await client.state(sid)
    assert paused.limit == "max_usd"
    assert state.steps == 2 and state.cost_usd == pytest.approx(0.6)  # read at 0.1x, not at the input price


async def test_a_wall_time_limit_pauses_before_the_first_model_call(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path, progressing()) as (api, _):
        sid = await client.submit("x", pool="p", budget=Budget(max_wall_s=0.001))
        paused = await _paused(client, sid)
    assert paused.limit == "max_wall" and "seconds" in paused.detail
    assert api.requests == []


async def test_the_pool_default_budget_applies_when_the_session_names_none(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path, progressing(), budget=Budget(max_tool_calls=1)):
        sid = await client.submit("x", pool="p")
        paused = await _paused(client, sid)
    assert (paused.limit, paused.detail) == ("max_tool_calls", "1 of 1 tool calls")


async def test_a_child_session_inherits_what_is_left_of_its_parents_budget(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def responder(request: dict[str, Any]) -> dict[str, Any]:
        first = str(request["messages"][0])
        if "CHILD" in first:
            return text_response("child done")
        turns = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if turns == 0:
            return tool_use_response("write_file", {"path": "a", "content": "1"})
        if turns == 1:
            return tool_use_response("delegate", {"prompt": "CHILD task"})
        return text_response("parent done")

    async with agent_with_fake(settings, tmp_path, responder, concurrency=2):
        sid = await client.submit("parent", pool="p", budget=Budget(max_steps=10, max_usd=1.0))
        state = await client.wait(sid, timeout=20)
    assert state.status == "completed"
    child = (await client.show(state.children[0]))[0].event
    assert isinstance(child, SessionCreated)
    assert child.task.budget.max_steps == 8  # two model calls spent when it delegated
    from agentbus.messages import ModelResponded

    spent_before = sum(r.event.cost_usd for r in await client.show(sid) if isinstance(r.event, ModelResponded))
    last = [r.event for r in await client.show(sid) if isinstance(r.event, ModelResponded)][-1]
    assert child.task.budget.max_usd == pytest.approx(1.0 - (spent_before - last.cost_usd))


async def test_a_model_repeating_one_tool_call_is_paused_for_no_progress(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    def stuck(_: dict[str, Any]) -> dict[str, Any]:
        return tool_use_response("read_file", {"path": "missing.txt"})

    async with agent_with_fake(settings, tmp_path, stuck) as (api, _):
        sid = await client.submit("x", pool="p")
        paused = await _paused(client, sid)
    assert paused.limit == "no_progress"
    assert "read_file" in paused.detail
    assert len(api.requests) == 3


async def test_a_model_making_progress_is_not_paused(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    async with agent_with_fake(settings, tmp_path, progressing(finish_after=8)):
        sid = await client.submit("x", pool="p")
        state = await client.wait(sid, timeout=30)
    assert state.status == "completed" and state.steps == 9


async def test_only_a_paused_session_can_be_resumed(client: agentbus.Client) -> None:
    sid = await client.submit("x", pool="nobody")
    with pytest.raises(UsageError, match="not paused"):
        await client.resume(sid)


def test_no_progress_counts_afresh_after_a_resume() -> None:
    from agentbus.messages import ModelResponded, Record, ResumeRequested
    from services.agent.guards import no_progress

    def call(i: int) -> ModelResponded:
        block = {"type": "tool_use", "id": f"t{i}", "name": "read_file", "input": {"path": "x"}}
        return ModelResponded(id=f"s{i}", step=i, model="m", content=(block,), stop_reason="tool_use")

    seq = itertools.count(1)
    records = [Record(seq=next(seq), session_id="s", channel="log", event=call(i)) for i in range(3)]
    assert no_progress(records, 3) is not None
    records.append(Record(seq=next(seq), session_id="s", channel="input", event=ResumeRequested(id="r", author="a")))
    assert no_progress(records, 3) is None


def test_guards_kept_as_the_log_grows_answer_as_read_afresh_at_every_step() -> None:
    """The run folds each record once (`Guards`); at every step of a session that loops, makes
    progress, is resumed with a new budget, or has an older record arrive late, the answer and the
    budget are those of the whole log read afresh."""
    from agentbus.budget import effective_budget, over_budget
    from agentbus.messages import (
        Budget,
        ModelResponded,
        Record,
        ResumeRequested,
        SessionCreated,
        Task,
        ToolCallCompleted,
    )
    from agentbus.state import SessionState, fold_all
    from services.agent.guards import Guards, no_progress

    rng = random.Random(16)
    pool = Budget(max_steps=150, max_tool_calls=400)
    guards, epoch = Guards(pool, 3), 0
    created = SessionCreated(id="c", task=Task(session_id="s", prompt="p", budget=Budget(max_steps=120)))
    records: list[Record] = [Record(seq=1, session_id="s", channel="control", event=created)]
    seq = itertools.count(10, 10)  # room below each record for one arriving late
    stops = set()
    for step in range(1, 200):
        path = rng.choice(["a", "b", "c", f"new-{step}"])
        block = {"type": "tool_use", "id": f"t{step}", "name": "read_file", "input": {"path": path}}
        text = [{"type": "text", "text": rng.choice(["", "again", f"note {step}"])}]
        event = ModelResponded(id=f"s{step}", step=step, model="m", content=(*text, block), stop_reason="tool_use")
        records.append(Record(seq=next(seq), session_id="s", channel="log", event=event))
        done = ToolCallCompleted(id=f"c{step}", step=step, tool_use_id=f"t{step}", name="read_file",
                                 output=rng.choice(["same", f"out {step}"]))  # fmt: skip
        records.append(Record(seq=next(seq), session_id="s", channel="log", event=done))
        if rng.random() < 0.05:
            raised = Budget(max_steps=step + rng.choice([-5, 30]))
            resume = ResumeRequested(id=f"r{step}", author="a", budget=raised)
            late = rng.random() < 0.5  # it arrives after the records past it were folded
            at = len(records) - 4 if late else len(records)
            records.insert(at, Record(seq=records[at - 1].seq + 1, session_id="s", channel="control", event=resume))
            epoch += late
        guards.fold(records, epoch)
        state = fold_all(SessionState(session_id="s"), records)
        budget = effective_budget(pool, records)
        assert guards.budget() == budget, step
        expected = over_budget(budget, state, 0.0) or no_progress(records, 3)
        assert guards.stop(state, 0.0) == expected, step
        stops.add(expected.limit if expected else None)
    assert stops == {None, "no_progress", "max_steps"}  # every answer came up
