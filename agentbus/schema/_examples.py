"""One example of every message kind, as agentbus writes it: shown in subjects.md, pinned in tests/golden/.

The values are what a real session carries (a session id in the documented form, `ts` in seconds
since the epoch), so a writer in another language can copy their shape.
"""

from __future__ import annotations

import msgspec

from agentbus import openings
from agentbus.messages import (
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
    Hold,
    HumanMessage,
    InboxDismissed,
    InputRejected,
    InterruptRequested,
    MessageDelivered,
    ModelCallFailed,
    ModelResponded,
    Opening,
    OpinionResult,
    OpinionsAggregated,
    PoolSpend,
    QuestionAsked,
    ResumeRequested,
    RevisionRequested,
    Routed,
    ScaleReply,
    ScaleRequest,
    SessionClaimed,
    SessionCreated,
    SessionEnded,
    SessionPaused,
    StatusChanged,
    SupervisorInfo,
    Task,
    Timer,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
    Usage,
    VerdictRecorded,
    WorkerInfo,
    WorkItem,
    encode,
)
from agentbus.state import SessionState

SID = "01kdvdnafmq3v8ze"  # 2026-01-01T00:00:00.5Z, then six random characters
CHILD = "01kdvdnbx2k7m4pa"
TS = 1767225600.5
WORKER = "host1-4242-a1b2"

_TASK = Task(
    session_id=SID,
    prompt="write a haiku about queues to haiku.txt",
    pool="general",
    criteria=("has three lines",),
    checks=("test -f haiku.txt",),
    budget=Budget(max_steps=20, max_usd=0.5, max_wall_s=600.0),
    submitter="ann",
)

EVENTS: tuple[msgspec.Struct, ...] = (
    SessionCreated(id="created", ts=TS, task=_TASK, trace_id="0af7651916cd43dd8448eb211c80319c"),
    Routed(id="routed", ts=TS + 0.01, pool="general"),
    SessionClaimed(id="claim-7-1", ts=TS + 0.2, worker=WORKER, workspace="/var/lib/agentbus/work/01kdvdnafmq3v8ze"),
    StatusChanged(id="status-3-waiting", ts=TS + 1, status="waiting", reason="asked a human", worker=WORKER),
    ModelResponded(
        id="step-1",
        ts=TS + 2.5,
        step=1,
        model="anthropic:claude-sonnet-4-6",
        content=(
            {"type": "text", "text": "I'll write it."},
            {"type": "tool_use", "id": "toolu_01", "name": "write_file", "input": {"path": "haiku.txt"}},
        ),
        stop_reason="tool_use",
        usage=Usage(input_tokens=1200, output_tokens=80, cache_read_input_tokens=900),
        cost_usd=0.00507,
        horizon=3,
    ),
    ModelCallFailed(
        id="step-2-failed-1",
        ts=TS + 3,
        step=2,
        model="anthropic:claude-sonnet-4-6",
        error="HTTP 529: overloaded",
        status=529,
        retry_in_s=4.0,
    ),
    ToolCallStarted(
        id="tool-toolu_01",
        ts=TS + 2.6,
        step=1,
        tool_use_id="toolu_01",
        name="write_file",
        input={"path": "haiku.txt", "content": "..."},
    ),
    ToolCallCompleted(
        id="tool-toolu_01-done",
        ts=TS + 2.7,
        step=1,
        tool_use_id="toolu_01",
        name="write_file",
        output="wrote 52 bytes to haiku.txt",
    ),
    HumanMessage(id="say-3f9a1c", ts=TS + 2, text="make it rhyme", author="ann"),
    MessageDelivered(id="delivered-5", ts=TS + 4, message_seq=5, message_id="say-3f9a1c", step=2),
    InterruptRequested(id="interrupt-77c2e1", ts=TS + 5, author="ann", text="use the other file"),
    QuestionAsked(id="ask-toolu_02", ts=TS + 6, text="which meter?", tool_use_id="toolu_02"),
    ToolCallParked(
        id="parked-toolu_02", ts=TS + 6, step=3, tool_use_id="toolu_02", name="ask_human", waiting_for="answer"
    ),
    ApprovalRequested(
        id="approval-toolu_03",
        ts=TS + 7,
        step=4,
        tool_use_id="toolu_03",
        name="bash",
        input={"command": "rm draft.txt"},
        timeout_s=300.0,
    ),
    ApprovalDecided(id="approve-0c4d2e", ts=TS + 8, tool_use_id="toolu_03", approved=True, author="ann"),
    SessionPaused(id="paused-9", ts=TS + 9, reason="interrupted", detail="by ann", author="ann"),
    InboxDismissed(id="dismiss-51aa09", ts=TS + 10, author="ann", note="seen"),
    CancelRequested(id="cancel-e2b7f0", ts=TS + 11, author="ann", reason="changed my mind"),
    ResumeRequested(id="resume-8d1c33", ts=TS + 12, author="ann", budget=Budget(max_usd=1.0)),
    DelegationRequested(
        id="delegate-toolu_04",
        ts=TS + 13,
        child_session=CHILD,
        pool="research",
        prompt="find three haiku about queues",
        tool_use_id="toolu_04",
    ),
    DelegationCompleted(
        id=f"delegated-{CHILD}",
        ts=TS + 14,
        child_session=CHILD,
        status="completed",
        result="three haiku",
        tool_use_id="toolu_04",
    ),
    OpinionsAggregated(
        id="aggregated",
        ts=TS + 15,
        results=(
            OpinionResult(session_id=f"{SID}-o1", pool="general", status="completed", result="a haiku"),
            OpinionResult(session_id=f"{SID}-o2", pool="fast", status="failed", reason="max_steps"),
        ),
    ),
    VerdictRecorded(
        id="verdict-1",
        ts=TS + 16,
        round=1,
        verdict="needs_revision",
        criteria=(CriterionResult(criterion="has three lines", passed=False, score=0.4, critique="four lines"),),
        checks=(CheckResult(command="test -f haiku.txt", passed=True, exit_code=0),),
        critique="- has three lines: four lines",
        grader_model="anthropic:claude-haiku-4-5",
        usage=Usage(input_tokens=400, output_tokens=60),
        cost_usd=0.0007,
    ),
    RevisionRequested(id="revision-2", ts=TS + 17, round=2, critique="- has three lines: four lines"),
    BudgetExceeded(id="budget-3", ts=TS + 18, limit="max_usd", detail="0.52 of 0.5 USD"),
    BranchCreated(
        id="branch",
        ts=TS + 18.1,
        repo="/srv/repos/backend",
        branch=f"agentbus/{SID}",
        base="main",
        base_commit="3f2a" + "0" * 36,
        worktree=f"/work/{SID}",
        review=True,
    ),
    ChangesCommitted(
        id="committed-round-1",
        ts=TS + 18.2,
        repo="/srv/repos/backend",
        branch=f"agentbus/{SID}",
        commit="9c1e" + "0" * 36,
        base="main",
        base_commit="3f2a" + "0" * 36,
        round=1,
        files_changed=1,
        insertions=3,
        stat=" haiku.txt | 3 +++",
    ),
    CommitFailed(
        id="commit-failed-round-2",
        ts=TS + 18.3,
        reason="nothing changed since the last commit",
        repo="/srv/repos/backend",
        branch=f"agentbus/{SID}",
        head="9c1e" + "0" * 36,
        round=2,
    ),
    BranchMerged(
        id="merged-9c1e",
        ts=TS + 18.4,
        branch=f"agentbus/{SID}",
        commit="9c1e" + "0" * 36,
        into="main",
        result="9c1e" + "0" * 36,
        fast_forward=True,
        author="ann",
    ),
    SessionEnded(id="ended", ts=TS + 19, status="completed", reason="satisfied", result="queues wait in line..."),
    InputRejected(
        id="input-rejected-12",
        ts=TS + 20,
        reason="human_message without author: not honoured",
        source=f"agentbus.session.{SID}.input.bob",
    ),
)

# The opening's MAC under an example key of 32 zero bytes, so a client in another language can
# check its own MAC code against the document (subjects.md, "The opening a routed work item carries").
EXAMPLE_WORK_KEY = bytes(32)
_CREATED, _ROUTED = encode(EVENTS[0]), encode(EVENTS[1])
_OPENING = Opening(
    created_seq=1, sender="ann", created=msgspec.Raw(_CREATED), routed_seq=2, routed=msgspec.Raw(_ROUTED),
    mac=openings.signed(EXAMPLE_WORK_KEY, SID, 1, "ann", _CREATED, 2, _ROUTED),
)  # fmt: skip

WORK: tuple[msgspec.Struct, ...] = (WorkItem(session_id=SID, opening=_OPENING),)

TIMERS: tuple[msgspec.Struct, ...] = (Timer(session_id=SID, due_ts=TS + 307, tool_use_id="toolu_03", round=1),)

STATE: tuple[msgspec.Struct, ...] = (
    SessionState(
        session_id=SID,
        status="running",
        pool="general",
        owner=WORKER,
        prompt="write a haiku about queues to haiku.txt",
        submitter="ann",
        created_ts=TS,
        updated_ts=TS + 2.7,
        last_seq=9,
        events=7,
        steps=1,
        tool_calls=1,
        usage=Usage(input_tokens=1200, output_tokens=80, cache_read_input_tokens=900),
        cost_usd=0.00507,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    ),
)

REGISTRY: tuple[msgspec.Struct, ...] = (
    WorkerInfo(
        worker_id=WORKER,
        pool="general",
        model="anthropic:claude-sonnet-4-6",
        host="host1",
        pid=4242,
        sessions=(SID,),
        started_ts=TS - 60,
        heartbeat_ts=TS + 1,
        concurrency=4,
    ),
    SupervisorInfo(
        supervisor_id="host1-4100-9f3e",
        pools=("general", "slow"),
        host="host1",
        pid=4100,
        started_ts=TS - 120,
        heartbeat_ts=TS + 1,
    ),
)

SPEND: tuple[msgspec.Struct, ...] = (
    PoolSpend(pool="general", usd=12.5, calls=840, since_ts=TS - 86400, updated_ts=TS),
    Hold(limit="pool_ceiling_usd", detail="50.02 of 50.0 USD", set_ts=TS),
)

SCALE: tuple[msgspec.Struct, ...] = (
    ScaleRequest(pool="general", count=2, reason="a fan-out of three", requester="agent-1"),
    ScaleReply(granted=1, reason="pool general is at its max of 4"),
)
