"""The wire format and the state fold, without a server: round trips, garbage, names, folding."""

from __future__ import annotations

import json
import random
import typing
from typing import Any

import msgspec
import pytest

import agentbus.state
from agentbus import messages
from agentbus.messages import (
    AnyEvent,
    ApprovalDecided,
    ApprovalRequested,
    BranchCreated,
    BranchMerged,
    Budget,
    BudgetExceeded,
    CancelRequested,
    ChangesCommitted,
    CheckResult,
    CommitFailed,
    CriterionResult,
    DelegationCompleted,
    DelegationRequested,
    Event,
    HumanMessage,
    InboxDismissed,
    InputRejected,
    InterruptRequested,
    InvalidEvent,
    MessageDelivered,
    ModelCallFailed,
    ModelResponded,
    OpinionResult,
    OpinionsAggregated,
    QuestionAsked,
    Record,
    ResumeRequested,
    RevisionRequested,
    Routed,
    SessionClaimed,
    SessionCreated,
    SessionEnded,
    SessionPaused,
    StatusChanged,
    Task,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
    UnknownEvent,
    Usage,
    VerdictRecorded,
    WorkItem,
)
from agentbus.state import SessionState, fold, fold_all
from agentbus.subjects import Namespace, parse_session_subject, session_id_from_subject

TS = 1_700_000_000.25

TASK = Task(
    session_id="s1",
    prompt="write a haiku about queues",
    pool="writers",
    criteria=("has three lines",),
    checks=("test -f haiku.txt",),
    max_rounds=2,
    budget=Budget(max_steps=10, max_tool_calls=5, max_tokens=1000, max_usd=0.5, max_wall_s=60.0),
    tags=("poetry",),
    submitter="ann",
    parent_session="p1",
    depth=1,
    model="claude-x",
    approve=("bash",),
    base="release-1",
)

# One instance of every event type, with non-default values wherever a field has one.
SAMPLES: list[AnyEvent] = [
    SessionCreated(id="created", ts=TS, task=TASK, trace_id="0af7651916cd43dd8448eb211c80319c"),
    Routed(id="routed", ts=TS, pool="writers", rule="tag:poetry", model="claude-x"),
    HumanMessage(id="say-1", ts=TS, text="shorter, please", author="ann", mode="queue"),
    InterruptRequested(id="interrupt-1", ts=TS, author="ann", text="stop and use the other file"),
    MessageDelivered(id="delivered-9", ts=TS, message_seq=9, message_id="say-1", step=3),
    ApprovalRequested(
        id="approval-tu5",
        ts=TS,
        step=2,
        tool_use_id="tu5",
        name="bash",
        input={"command": "rm x"},
        timeout_s=30.0,
        on_timeout="pause",
    ),
    ApprovalDecided(id="approval-1", ts=TS, tool_use_id="tu5", approved=False, author="ann", reason="not that file"),
    ToolCallParked(id="parked-1", ts=TS, step=2, tool_use_id="tu5", name="bash", waiting_for="approval", detail="d"),
    SessionPaused(id="paused-i9", ts=TS, reason="interrupted", detail="by ann", author="ann"),
    InboxDismissed(id="dismiss-1", ts=TS, author="ann", note="looked at it"),
    CancelRequested(id="cancel-1", ts=TS, author="ann", reason="changed my mind"),
    ResumeRequested(id="resume-1", ts=TS, author="ann", budget=Budget(max_steps=20)),
    StatusChanged(id="status-1", ts=TS, status="waiting", reason="asked a human", worker="agent-7"),
    SessionClaimed(id="claim-1", ts=TS, worker="agent-7", attempt=2, round=2),
    ModelResponded(
        id="model-1",
        ts=TS,
        step=1,
        model="claude-x",
        content=({"type": "text", "text": "hi"}, {"type": "tool_use", "id": "tu1", "input": {"a": [1, 2]}}),
        stop_reason="tool_use",
        usage=Usage(input_tokens=10, output_tokens=5, cache_creation_input_tokens=3, cache_read_input_tokens=2),
        cost_usd=0.0125,
        round=2,
    ),
    ModelCallFailed(
        id="model-failed-1",
        ts=TS,
        step=1,
        model="claude-x",
        error="HTTP 529: overloaded",
        status=529,
        attempt=2,
        retry_in_s=4.0,
    ),
    ToolCallStarted(id="tool-1", ts=TS, step=1, tool_use_id="tu1", name="shell", input={"cmd": "ls"}, rerun=True),
    ToolCallCompleted(id="tool-1-done", ts=TS, step=1, tool_use_id="tu1", name="shell", output="a\nb", is_error=True),
    QuestionAsked(id="ask-1", ts=TS, text="which meter?", tool_use_id="tu2"),
    DelegationRequested(id="dele-1", ts=TS, child_session="c1", pool=None, prompt="research", tool_use_id="tu3"),
    DelegationCompleted(id="dele-1-done", ts=TS, child_session="c1", status="failed", result="x", tool_use_id="tu3"),
    VerdictRecorded(
        id="verdict-1",
        ts=TS,
        round=1,
        verdict="needs_revision",
        criteria=(CriterionResult(criterion="has three lines", passed=False, score=0.5, critique="four"),),
        checks=(CheckResult(command="test -f haiku.txt", passed=True, exit_code=0, output="ok"),),
        critique="one line too many",
        grader_model="claude-haiku-4-5",
        usage=Usage(input_tokens=100, output_tokens=20),
        cost_usd=0.0002,
    ),
    OpinionsAggregated(
        id="aggregated", ts=TS, results=(OpinionResult(session_id="s-o1", pool="p", status="completed", result="ok"),)
    ),
    RevisionRequested(id="revision-2", ts=TS, round=2, critique="check failed: test -f x", fresh_start=True),
    BudgetExceeded(id="budget-1", ts=TS, limit="max_steps", detail="10 of 10"),
    BranchCreated(
        id="branch",
        ts=TS,
        repo="/srv/repos/x",
        branch="agentbus/s1",
        base="main",
        base_commit="a" * 40,
        worktree="/work/s1",
        review=True,
    ),
    ChangesCommitted(
        id="committed-round-1",
        ts=TS,
        repo="/srv/repos/x",
        branch="agentbus/s1",
        commit="b" * 40,
        base="main",
        base_commit="a" * 40,
        round=2,
        files_changed=3,
        insertions=10,
        deletions=2,
        stat=" a | 2 +-",
    ),
    CommitFailed(
        id="commit-failed-round-1",
        ts=TS,
        reason="commit refused: hook",
        repo="/srv/repos/x",
        branch="agentbus/s1",
        head="a" * 40,
        round=2,
    ),
    BranchMerged(
        id="merged-1",
        ts=TS,
        branch="agentbus/s1",
        commit="b" * 40,
        into="main",
        result="c" * 40,
        fast_forward=True,
        author="ann",
    ),
    SessionEnded(id="ended", ts=TS, status="completed", reason="satisfied", result="the haiku"),
    InputRejected(id="rejected-1", ts=TS, reason="not JSON", source="x.y"),
]


def _sample_id(ev: AnyEvent) -> str:
    return messages.event_type(ev)


def _record(seq: int, event: messages.LogEvent, *, channel: str = "log") -> Record:
    return Record(seq=seq, session_id="s1", channel=channel, event=event)


def _decode_or_fail(data: bytes) -> messages.LogEvent:
    """decode_event, turning an escaped exception into a failure that names the input."""
    try:
        event = messages.decode_event(data)
    except Exception as err:
        pytest.fail(f"decode_event raised {err!r} on {data[:120]!r}")
    assert isinstance(event, InvalidEvent | UnknownEvent | Event)
    return event


def _fold_all(records: list[Record], state: SessionState | None = None) -> SessionState:
    state = state or SessionState(session_id="s1")
    for rec in records:
        state = fold(state, rec)
    return state


# --- round trips ---------------------------------------------------------------------------------


def test_there_is_a_sample_of_every_event_type() -> None:
    assert {type(ev) for ev in SAMPLES} == set(messages.EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=_sample_id)
def test_every_event_type_round_trips_through_encode_and_decode(event: AnyEvent) -> None:
    data = messages.encode(event)

    decoded = messages.decode_event(data)

    assert decoded == event
    assert type(decoded) is type(event)
    assert json.loads(data)["type"] == messages.event_type(event)


@pytest.mark.parametrize("event", SAMPLES, ids=_sample_id)
def test_an_event_written_with_only_required_fields_decodes_with_defaults(event: AnyEvent) -> None:
    cls = type(event)
    required = {
        f.encode_name: msgspec.to_builtins(getattr(event, f.name)) for f in msgspec.structs.fields(cls) if f.required
    }
    data = json.dumps({"type": messages.event_type(event), **required}).encode()

    decoded = messages.decode_event(data)

    assert type(decoded) is cls
    assert decoded.v == messages.SCHEMA_VERSION


def test_task_and_work_item_round_trip() -> None:
    item = WorkItem(session_id="s1", reason="revision", round=2)

    assert msgspec.json.decode(messages.encode(TASK), type=messages.Task) == TASK
    assert messages.decode_work(messages.encode(item)) == item


@pytest.mark.parametrize("event", SAMPLES, ids=_sample_id)
def test_events_are_frozen(event: AnyEvent) -> None:
    with pytest.raises(AttributeError):
        event.id = "changed"  # type: ignore[misc]
    assert event.id != "changed"


@pytest.mark.parametrize(
    "value",
    [
        TASK,
        Budget(max_steps=1),
        Usage(input_tokens=1),
        WorkItem(session_id="s1"),
        UnknownEvent(type="x"),
        InvalidEvent(reason="r"),
        Record(seq=1, session_id="s1", channel="log", event=SAMPLES[0]),
    ],
    ids=lambda v: type(v).__name__,
)
def test_wire_types_and_read_back_values_are_frozen(value: msgspec.Struct) -> None:
    name = msgspec.structs.fields(type(value))[0].name

    with pytest.raises(AttributeError):
        setattr(value, name, None)


# --- garbage never raises -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"null",
        b"{}",
        b"0",
        b'"a string"',
        b"\xff not json",
        b"\x00\x01\x02",
        b'{"type": 5, "id": "x"}',
        b'{"type": null}',
        b'{"id": "no-type"}',
        b'{"type": "human_message"',
        b'{"type": "from_the_future", "ts": 1e999}',
    ],
)
def test_decode_event_turns_garbage_into_an_invalid_event(data: bytes) -> None:
    event = messages.decode_event(data)

    assert isinstance(event, InvalidEvent)
    assert event.reason
    assert messages.event_type(event) == "invalid"


@pytest.mark.parametrize(
    "data",
    [
        b'{"type": "human_message", "id": "h1", "text": "\xff", "author": "a"}',
        b'{"type": "human_message", "id": "h1", "text": "caf\xc3", "author": "a"}',
        b'{"type": "from_the_future", "id": "h1", "note": "\xed\xa0\x80"}',
    ],
    ids=["stray-byte", "truncated-multibyte", "surrogate"],
)
def test_decode_event_turns_invalid_utf8_inside_a_string_into_an_invalid_event(data: bytes) -> None:
    event = _decode_or_fail(data)

    assert isinstance(event, InvalidEvent)


def test_decode_event_never_raises_on_random_bytes() -> None:
    rng = random.Random(20240601)
    for _ in range(5000):
        _decode_or_fail(rng.randbytes(rng.randrange(0, 64)))


def test_decode_event_never_raises_on_mutated_valid_events() -> None:
    rng = random.Random(7)
    originals = [messages.encode(ev) for ev in SAMPLES]
    for _ in range(3000):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        _decode_or_fail(bytes(data))


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "human_message", "id": "h1", "text": 42, "author": "ann"},
        {"type": "human_message", "id": "h1", "text": "hi"},
        {"type": "status_changed", "id": "h1", "status": "exploded"},
        {"type": "model_responded", "id": "h1", "step": "one", "model": "m", "content": []},
        {"type": "session_created", "id": "h1", "task": {"prompt": "no session id"}},
    ],
    ids=["wrong-type", "missing-field", "bad-literal", "string-for-int", "bad-nested-task"],
)
def test_a_known_type_with_wrong_fields_is_an_invalid_event_that_keeps_its_id(payload: dict[str, Any]) -> None:
    event = messages.decode_event(json.dumps(payload).encode())

    assert isinstance(event, InvalidEvent)
    assert event.reason.startswith("invalid event:")
    assert event.id == "h1"
    assert payload["type"] in event.raw


def test_decode_event_never_raises_on_deeply_nested_json() -> None:
    depth = 5000
    nested = b'{"type": "human_message", "id": "h1", "text": "t", "author": "a", "x": '
    data = nested + b"[" * depth + b"]" * depth + b"}"

    event = _decode_or_fail(data)

    assert isinstance(event, InvalidEvent | HumanMessage)


def test_an_invalid_event_keeps_only_the_start_of_a_huge_payload() -> None:
    event = messages.decode_event(b"\xff" + b"x" * 100_000)

    assert isinstance(event, InvalidEvent)
    assert 0 < len(event.raw) <= 200


def test_an_unknown_event_type_is_kept_with_its_data_and_re_encodes_to_the_same_fields() -> None:
    original = {
        "type": "from_the_future",
        "id": "f1",
        "ts": TS,
        "v": 7,
        "payload": {"nested": [1, 2, {"k": None}]},
        "note": "é ünïcode",
    }

    event = messages.decode_event(json.dumps(original).encode())

    assert event == UnknownEvent(
        type="from_the_future",
        id="f1",
        ts=TS,
        v=7,
        data={"payload": {"nested": [1, 2, {"k": None}]}, "note": "é ünïcode"},
    )
    assert json.loads(messages.encode(event)) == original
    assert messages.event_type(event) == "from_the_future"


# --- to_builtins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES, ids=_sample_id)
def test_to_builtins_of_an_event_is_the_json_that_goes_on_the_wire(event: AnyEvent) -> None:
    out = messages.to_builtins(event)

    assert json.loads(json.dumps(out)) == json.loads(messages.encode(event))
    assert out["type"] == messages.event_type(event)


@pytest.mark.parametrize(
    "event",
    [
        UnknownEvent(type="from_the_future", id="f1", ts=TS, v=2, data={"a": (1, 2), "b": {"c": 1.5}}),
        InvalidEvent(reason="not JSON: boom", raw="\ufffd not json", id="x", ts=0.0),
        *SAMPLES,
    ],
    ids=lambda e: messages.event_type(e),
)
def test_to_builtins_of_a_record_is_json_serialisable(event: messages.LogEvent) -> None:
    record = Record(seq=12, session_id="s1", channel="input", event=event)

    out = json.loads(json.dumps(messages.to_builtins(record)))

    assert out["seq"] == 12
    assert out["session_id"] == "s1"
    assert out["channel"] == "input"
    assert out["event"]["type"] == messages.event_type(event)


def test_to_builtins_marks_an_invalid_event_as_type_invalid() -> None:
    out = messages.to_builtins(InvalidEvent(reason="not JSON", raw="\xff"))

    assert out == {"type": "invalid", "reason": "not JSON", "raw": "\xff", "id": "", "ts": 0.0}


# --- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["", "Agentbus", "AGENTBUS", "1abc", "-abc", "_abc", "a.b", "a b", "a*", "a>", "a/b", "a-b", "a" * 33]
)
def test_namespace_rejects_a_prefix_that_is_not_a_lowercase_token(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Namespace(prefix)


@pytest.mark.parametrize("prefix", ["a", "agentbus", "t1_x2", "a" * 32])
def test_namespace_accepts_a_lowercase_token_prefix(prefix: str) -> None:
    assert Namespace(prefix).prefix == prefix


def test_namespace_builds_the_documented_subjects_and_names() -> None:
    ns = Namespace("acme_dev")

    assert ns.session_log("s1") == "acme_dev.session.s1.log"
    assert ns.session_input("s1", "ann") == "acme_dev.session.s1.input.ann"
    assert ns.session_control("s1", "ann") == "acme_dev.session.s1.control.ann"
    assert ns.session_all("s1") == "acme_dev.session.s1.>"
    assert ns.sessions_all() == "acme_dev.session.>"
    assert ns.submissions() == "acme_dev.submit"
    assert ns.work("writers") == "acme_dev.work.writers"
    assert ns.work_all() == "acme_dev.work.*"
    assert ns.sessions_stream == "ACME_DEV_SESSIONS"
    assert ns.submissions_stream == "ACME_DEV_SUBMIT"
    assert ns.work_stream == "ACME_DEV_WORK"
    assert ns.state_bucket == "ACME_DEV_state"
    assert ns.pool_consumer("writers").durable == "pool-writers"
    assert ns.router_consumer().filter_subject == "acme_dev.submit"


def test_every_stream_captures_exactly_the_subjects_built_for_it() -> None:
    ns = Namespace("p")

    streams = {spec.name: spec for spec in ns.streams()}

    assert streams["P_SESSIONS"].subjects == ("p.session.*.log", "p.session.*.input.*", "p.session.*.control.*")
    assert streams["P_SESSIONS"].retention == "limits"
    assert streams["P_SUBMIT"].subjects == ("p.submit",)
    assert streams["P_WORK"].subjects == ("p.work.*",)
    assert streams["P_WORK"].retention == "workqueue"
    assert [b.name for b in ns.buckets()] == ["P_state", "P_workers", "P_supervisors", "P_spend", "P_keys"]


@pytest.mark.parametrize("bad", ["a.b", "a b", "a*", "a>", "", "x" * 65, "ü"])
def test_namespace_refuses_a_session_id_or_pool_that_would_break_a_subject(bad: str) -> None:
    ns = Namespace("p")

    for build in (ns.session_log, ns.session_all, ns.work, ns.pool_consumer):
        with pytest.raises(ValueError):
            build(bad)
    for build2 in (ns.session_input, ns.session_control):
        with pytest.raises(ValueError):
            build2(bad, "ann")  # a bad session id
        with pytest.raises(ValueError):
            build2("s1", bad)  # a user name that would break the subject


def test_the_session_id_is_read_back_from_its_subjects() -> None:
    ns = Namespace("p")

    assert session_id_from_subject(ns.session_log("s-1_x")) == "s-1_x"
    assert session_id_from_subject(ns.session_input("s-1_x", "ann")) == "s-1_x"
    assert session_id_from_subject(ns.session_control("s-1_x", "ann")) == "s-1_x"
    assert session_id_from_subject("p.session.s-1_x.input") == "s-1_x"  # written before senders were in it
    assert parse_session_subject(ns.session_input("s1", "ann")) == ("s1", "input", "ann")
    assert parse_session_subject(ns.session_log("s1")) == ("s1", "log", "")
    assert parse_session_subject("p.session.s1.log.extra") is None
    assert session_id_from_subject(ns.work("writers")) is None
    assert session_id_from_subject(ns.submissions()) is None


@pytest.mark.parametrize(("a", "b"), [("a_b", "ab"), ("x_y", "x_y_")])
def test_distinct_prefixes_never_share_a_stream_or_bucket(a: str, b: str) -> None:
    first, second = Namespace(a), Namespace(b)

    assert {s.name for s in first.streams()}.isdisjoint({s.name for s in second.streams()})
    assert first.state_bucket != second.state_bucket


# --- the fold -----------------------------------------------------------------------------------------


def _lifecycle() -> list[Record]:
    events: list[messages.LogEvent] = [
        SessionCreated(id="created", ts=TS, task=TASK),
        Routed(id="routed", ts=TS + 1, pool="writers"),
        SessionClaimed(id="claim-1", ts=TS + 2, worker="agent-7"),
        ModelResponded(
            id="model-1", ts=TS + 3, step=1, model="m", content=(), usage=Usage(input_tokens=10), cost_usd=0.5
        ),
        ToolCallCompleted(id="tool-1", ts=TS + 4, step=1, tool_use_id="tu1", name="shell", output="ok"),
        HumanMessage(id="say-1", ts=TS + 5, text="hi", author="ann"),
        UnknownEvent(type="from_the_future", id="f1", ts=TS + 6),
        InvalidEvent(reason="not JSON"),
    ]
    return [_record(seq, ev) for seq, ev in enumerate(events, start=3)]


def test_fold_follows_a_session_through_its_lifecycle() -> None:
    state = _fold_all(_lifecycle())

    assert state.status == "running"
    assert state.pool == "writers"
    assert state.owner == "agent-7"
    assert state.steps == 1
    assert state.tool_calls == 1
    assert state.usage.input_tokens == 10
    assert state.cost_usd == 0.5
    assert state.events == 8
    assert state.last_seq == 10
    assert state.created_ts == TS
    assert state.updated_ts == TS + 6


def test_folding_the_same_records_twice_is_harmless() -> None:
    records = _lifecycle()
    once = _fold_all(records)

    twice = _fold_all(records, once)

    assert twice == once


def test_fold_ignores_a_record_at_or_below_the_last_sequence() -> None:
    state = _fold_all(_lifecycle())
    late = ModelResponded(id="model-9", step=9, model="m", content=(), usage=Usage(input_tokens=99))

    for seq in (1, state.last_seq):
        assert fold(state, _record(seq, late)) == state


def test_fold_does_not_modify_the_state_it_is_given() -> None:
    before = SessionState(session_id="s1")

    after = fold(before, _record(1, Routed(id="routed", pool="writers")))

    assert before == SessionState(session_id="s1")
    assert after.status == "queued"


def _fold_as_written_first(state: SessionState, record: Record) -> SessionState:
    """The fold as it was first written (a copy per record, `needs_person_now` asked before and
    after each): `fold` and `fold_all` must agree with it on any records."""
    if record.seq <= state.last_seq:
        return state
    s = msgspec.structs.replace(state, last_seq=record.seq, events=state.events + 1)
    ev = record.event
    ts = getattr(ev, "ts", 0.0) or s.updated_ts
    s.updated_ts = max(s.updated_ts, ts)
    before = (s.status, s.waiting_for, s.needs_person_now())
    was_parked = s.parked
    agentbus.state._apply(s, ev)
    if s.parked and not was_parked:
        s.parked_at = record.seq - 1 if isinstance(ev, HumanMessage) else record.seq
    if (s.status, s.waiting_for, s.needs_person_now()) != before:
        agentbus.state._attention(s, ts)
    return s


def test_fold_all_and_fold_agree_with_the_fold_as_first_written_on_random_logs() -> None:
    rng = random.Random(16)
    for _ in range(400):
        seq, records = 0, []
        for _ in range(rng.randint(1, 40)):
            seq = seq + rng.randint(1, 3) if rng.random() > 0.1 else max(seq - rng.randint(0, 2), 1)  # repeats too
            records.append(_record(seq, rng.choice(SAMPLES), channel=rng.choice(("log", "log", "input", "control"))))
        start = SessionState(session_id="s1")
        expected = start
        for rec in records:
            expected = _fold_as_written_first(expected, rec)

        assert _fold_all(records) == expected
        assert fold_all(start, records) == expected
        assert start == SessionState(session_id="s1")  # never changed in place
        assert fold_all(expected, records) is expected  # nothing new: the same state back
        cut = rng.randint(0, len(records))  # a state folded so far, then the rest onto it
        middle = fold_all(start, records[:cut])
        before = msgspec.json.encode(middle)
        assert fold_all(middle, records[cut:]) == expected
        assert msgspec.json.encode(middle) == before  # the state it was given is left as it was


@pytest.mark.parametrize(
    "ending",
    [
        SessionEnded(id="ended", status="completed", result="done"),
        SessionEnded(id="ended", status="failed", reason="boom"),
        SessionEnded(id="ended", status="cancelled", reason="asked"),
        StatusChanged(id="ended", status="failed", reason="boom"),
    ],
    ids=["completed", "failed", "cancelled", "failed-by-status"],
)
def test_a_terminal_status_never_changes_afterwards(ending: AnyEvent) -> None:
    ended = _fold_all([*_lifecycle(), _record(11, ending)])
    later: list[AnyEvent] = [
        StatusChanged(id="s", status="running", reason="again", worker="agent-9"),
        Routed(id="r2", pool="other"),
        SessionClaimed(id="c2", worker="agent-9", round=3),
        BudgetExceeded(id="b", limit="max_steps"),
        SessionEnded(id="ended-2", status="completed", result="something else"),
        ModelResponded(id="m2", step=2, model="m", content=(), usage=Usage(input_tokens=5)),
    ]

    final = _fold_all([_record(seq, ev) for seq, ev in enumerate(later, start=12)], ended)

    assert ended.terminal
    assert (final.status, final.reason, final.result, final.pool, final.owner, final.steps) == (
        ended.status,
        ended.reason,
        ended.result,
        ended.pool,
        ended.owner,
        ended.steps,
    )
    assert final.last_seq == 17
    assert final.events == ended.events + len(later)


def _reviewed(review: bool, *, commit: bool = True) -> list[Record]:
    events: list[messages.LogEvent] = [
        *(r.event for r in _lifecycle()[:3]),
        BranchCreated(
            id="branch", ts=TS + 3, repo="/r", branch="agentbus/s1", base="main", base_commit="a" * 40, review=review
        ),
        *(
            [
                ChangesCommitted(
                    id="committed-round-1",
                    ts=TS + 4,
                    repo="/r",
                    branch="agentbus/s1",
                    commit="b" * 40,
                    files_changed=2,
                    insertions=5,
                    deletions=1,
                )
            ]
            if commit
            else []
        ),
        SessionEnded(id="ended", ts=TS + 5, status="completed", result="done"),
    ]
    return [_record(seq, ev) for seq, ev in enumerate(events, start=1)]


def test_a_completed_branch_whose_pool_wants_a_review_needs_a_person_until_it_is_merged() -> None:
    from agentbus.inbox import item_of

    ended = _fold_all(_reviewed(review=True))
    assert (ended.branch, ended.commit, ended.files_changed, ended.insertions, ended.deletions) == (
        "agentbus/s1", "b" * 40, 2, 5, 1,
    )  # fmt: skip
    assert ended.needs_person and ended.attention_since == TS + 5
    item = item_of(ended)
    assert item.present and item.why == "ready for review: agentbus/s1 at bbbbbbbbbbbb (2 files, +5 -1)"
    assert item.command.startswith("agentbus diff s1; agentbus merge s1")
    merged = fold(ended, _record(7, BranchMerged(id="m", ts=TS + 6, branch="agentbus/s1", result="c" * 40),
                                 channel="control"))  # fmt: skip
    assert merged.merged == "c" * 40 and not merged.needs_person and merged.attention_since == 0.0
    assert merged.status == "completed"  # a merge changes no outcome


@pytest.mark.parametrize(("review", "commit"), [(False, True), (True, False)], ids=["no-review", "nothing-committed"])
def test_a_completed_branch_needs_nobody_without_a_review_or_without_a_commit(review: bool, commit: bool) -> None:
    assert not _fold_all(_reviewed(review, commit=commit)).needs_person


def test_no_event_class_derives_from_another() -> None:
    """The state fold matches events by class with the kinds of a long log first (`state._apply`):
    that order is free only while no event class is a subclass of another."""
    kinds = [*typing.get_args(AnyEvent), messages.UnknownEvent, messages.InvalidEvent]
    assert len(kinds) > 30
    for kind in kinds:
        others = [k for k in kinds if k is not kind and issubclass(kind, k)]
        assert not others, f"{kind.__name__} derives from {[k.__name__ for k in others]}"


def test_a_token_with_a_trailing_newline_is_no_token() -> None:
    from agentbus.subjects import Namespace, valid_token

    assert valid_token("alice") and not valid_token("alice\n") and not valid_token("a\nb")
    with pytest.raises(ValueError):
        Namespace("agentbus").session_log("s1\n")
    with pytest.raises(ValueError):
        Namespace("agentbus\n")
