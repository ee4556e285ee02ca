"""The conversation rebuilt from the log: valid for the Messages API, and a stable prefix step to step."""

from __future__ import annotations

import itertools

from agentbus.messages import (
    HumanMessage,
    LogEvent,
    ModelResponded,
    QuestionAsked,
    Record,
    RevisionRequested,
    SessionCreated,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
)
from services.agent.conversation import build


def _records(*events: LogEvent) -> list[Record]:
    return [Record(seq=i, session_id="s", channel="log", event=e) for i, e in enumerate(events, 1)]


CREATED = SessionCreated(id="created", task=Task(session_id="s", prompt="do it"))


def _tool_step(step: int, horizon: int, tid: str) -> ModelResponded:
    content = ({"type": "tool_use", "id": tid, "name": "read_file", "input": {"path": "a"}},)
    return ModelResponded(
        id=f"step-{step}", step=step, model="m", content=content, stop_reason="tool_use", horizon=horizon
    )


def test_a_message_said_while_the_model_was_thinking_follows_its_reply() -> None:
    recs = _records(
        CREATED,
        HumanMessage(id="h1", text="use blue", author="ann"),  # seq 2, after the request (horizon 1)
        _tool_step(1, horizon=1, tid="t1"),
        ToolCallStarted(id="ts", step=1, tool_use_id="t1", name="read_file"),
        ToolCallCompleted(id="tc", step=1, tool_use_id="t1", name="read_file", output="x"),
    )
    conv = build(recs)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user"]
    assert conv.messages[0]["content"] == [{"type": "text", "text": "do it"}]
    last = conv.messages[-1]["content"]
    assert last[0]["type"] == "tool_result" and "use blue" in last[1]["text"]


def test_each_request_extends_the_previous_one_so_the_cache_prefix_holds() -> None:
    events: list[LogEvent] = [CREATED]
    previous: list[dict[str, object]] = []
    for step in range(1, 4):
        events.append(_tool_step(step, horizon=len(events), tid=f"t{step}"))
        events.append(
            ToolCallCompleted(id=f"tc{step}", step=step, tool_use_id=f"t{step}", name="read_file", output="x")
        )
        events.append(HumanMessage(id=f"h{step}", text=f"note {step}", author="ann"))
        messages = build(_records(*events)).messages
        assert messages[: len(previous)] == previous
        previous = messages
    roles = [m["role"] for m in previous]
    assert all(a != b for a, b in itertools.pairwise(roles))  # roles alternate


def test_a_started_tool_with_no_result_is_pending_and_marked_started() -> None:
    conv = build(
        _records(CREATED, _tool_step(1, 1, "t1"), ToolCallStarted(id="ts", step=1, tool_use_id="t1", name="r"))
    )
    assert [(u.id, u.started) for u in conv.pending_tools] == [("t1", True)]
    assert conv.messages[-1]["role"] == "assistant"


def test_the_answer_to_ask_human_is_its_tool_result_not_an_extra_turn() -> None:
    ask = ModelResponded(
        id="step-1",
        step=1,
        model="m",
        content=({"type": "tool_use", "id": "q", "name": "ask_human", "input": {"question": "?"}},),
        stop_reason="tool_use",
    )
    conv = build(
        _records(
            CREATED, ask, QuestionAsked(id="qa", text="?", tool_use_id="q"), HumanMessage(id="h", text="42", author="b")
        )
    )
    assert conv.answer is not None and conv.answer.text == "42"
    assert conv.unanswered_humans == 0


def test_a_fresh_start_revision_drops_the_old_conversation() -> None:
    done = ModelResponded(
        id="step-1", step=1, model="m", content=({"type": "text", "text": "v1"},), stop_reason="end_turn"
    )
    conv = build(_records(CREATED, done, RevisionRequested(id="r2", round=2, critique="redo", fresh_start=True)))
    assert conv.messages == [
        {"role": "user", "content": [{"type": "text", "text": "do it"}, {"type": "text", "text": "redo"}]}
    ]
    assert conv.round == 2 and not conv.done


def test_a_question_asked_again_after_a_crash_keeps_the_answer_given_meanwhile() -> None:
    ask = ModelResponded(
        id="step-1",
        step=1,
        model="m",
        content=({"type": "tool_use", "id": "q", "name": "ask_human", "input": {"question": "?"}},),
        stop_reason="tool_use",
    )
    recs = _records(
        CREATED,
        ask,
        QuestionAsked(id="qa", text="?", tool_use_id="q"),
        HumanMessage(id="h", text="42", author="b"),
        QuestionAsked(id="qa-again", text="?", tool_use_id="q"),  # re-written after the dedup window
    )
    conv = build(recs)
    assert conv.answer is not None and conv.answer.text == "42"


def test_a_record_of_a_kind_the_builder_does_not_read_leaves_the_conversation_as_it_was() -> None:
    """`SessionRun.conversation` reuses its last build while only such records came after it."""
    from agentbus.messages import InputRejected, SessionClaimed, StatusChanged
    from services.agent.conversation import affects

    base = _records(CREATED, _tool_step(1, horizon=1, tid="t1"))
    extra = _records(
        CREATED,
        _tool_step(1, horizon=1, tid="t1"),
        SessionClaimed(id="claim-1", worker="w", attempt=1),
        StatusChanged(id="s", status="running", reason="r"),
        InputRejected(id="input-rejected-9", reason="x", source="s"),
    )
    assert not any(affects(r) for r in extra[2:])
    assert build(extra) == build(base)
    assert all(affects(r) for r in base)


def test_no_kind_the_conversation_reads_has_a_subclass() -> None:
    """The builder picks a record's handler by its exact type: a subclass of a kind it reads would
    be passed over where an isinstance test would have taken it."""
    from services.agent.conversation import _ADD, READ_KINDS

    assert set(_ADD) == set(READ_KINDS)
    assert [kind.__name__ for kind in READ_KINDS if kind.__subclasses__()] == []
