"""Session state: a pure fold over a session's events (cached in KV by `SessionLog.state`)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import msgspec

from agentbus.messages import (
    TERMINAL,
    ApprovalRequested,
    BranchCreated,
    BranchMerged,
    BudgetExceeded,
    CancelRequested,
    ChangesCommitted,
    DelegationRequested,
    EpochSecondsOrUnset,
    HumanMessage,
    InboxDismissed,
    MessageDelivered,
    ModelResponded,
    QuestionAsked,
    Record,
    ResumeRequested,
    RevisionRequested,
    Routed,
    SessionClaimed,
    SessionCreated,
    SessionEnded,
    SessionPaused,
    Status,
    StatusChanged,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
    Usage,
    VerdictRecorded,
)

_ATTENTION = ("paused", "failed", "awaiting_approval")


class SessionState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a session looks like after the events up to `last_seq`."""

    session_id: str
    status: Status = "pending"
    pool: str | None = None
    owner: str | None = None
    prompt: str = ""
    submitter: str = ""
    parent_session: str | None = None
    depth: int = 0
    created_ts: EpochSecondsOrUnset = 0.0
    updated_ts: EpochSecondsOrUnset = 0.0
    last_seq: int = 0
    events: int = 0
    steps: int = 0
    tool_calls: int = 0
    usage: Usage = Usage()
    cost_usd: float = 0.0
    round: int = 1
    result: str = ""
    reason: str = ""
    trace_id: str | None = None
    children: tuple[str, ...] = ()
    cancel_requested: bool = False
    # parked: no agent holds the session; an answer, a decision or a child's end queues it again
    parked: bool = False
    parked_at: int = 0  # the sequence it parked at: only input after it can wake it
    waiting_for: str = ""  # answer, approval or subtask, while parked on a tool call
    question: str = ""  # what the person is asked: the question, or the tool call to approve
    tool_use_id: str = ""  # the parked tool call
    turn: int = 1  # a follow-up on a completed session opens the next turn
    turn_round: int = 1  # the first evaluation round of this turn
    attention_since: EpochSecondsOrUnset = 0.0  # when it last started to need a person (0: it does not)
    dismissed: bool = False  # someone looked since then (inbox --dismiss)
    # a session on a repository (issue 19): its branch, the last commit recorded on it, the branch's
    # changes against its base at that commit, whether its pool wants a review, and the merge
    repo: str = ""
    branch: str = ""
    base: str = ""
    commit: str = ""
    files_changed: int = 0
    insertions: int = 0
    deletions: int = 0
    review: bool = False
    merged: str = ""  # what the base pointed at after `agentbus merge` (empty: not merged)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def needs_person_now(self) -> bool:
        """`needs_person` regardless of a dismissal."""
        return _needs_person(self.status, self.waiting_for, self.review, self.commit, self.merged)

    @property
    def needs_person(self) -> bool:
        """Waiting for an answer or an approval, paused, or failed, and nobody has dismissed it since."""
        return not self.dismissed and self.needs_person_now()


def fold(state: SessionState, record: Record) -> SessionState:
    """Apply one record; records at or below `last_seq` are ignored, so folding twice is harmless."""
    if record.seq <= state.last_seq:
        return state
    s = msgspec.structs.replace(state)
    _step(s, record)
    return s


def fold_all(state: SessionState, records: Iterable[Record]) -> SessionState:
    """`fold` of each record in turn, the state copied once rather than once per record (a resume
    folds a thousand). The state passed in is never changed."""
    s: SessionState | None = None
    for record in records:
        if record.seq <= (state if s is None else s).last_seq:
            continue
        if s is None:
            s = msgspec.structs.replace(state)
        _step(s, record)
    return state if s is None else s


def _step(s: SessionState, record: Record) -> None:
    s.last_seq, s.events = record.seq, s.events + 1
    ev = record.event
    ts = getattr(ev, "ts", 0.0) or s.updated_ts
    s.updated_ts = max(s.updated_ts, ts)
    kind = type(ev)
    if kind in _COUNTERS and not s.terminal:
        # most of a long log: they change no status and nothing `needs_person_now` reads
        if kind is ModelResponded:
            s.steps += 1
            s.usage = _add(s.usage, ev.usage)  # type: ignore[union-attr]
            s.cost_usd += ev.cost_usd  # type: ignore[union-attr]
        return
    # what `needs_person_now` reads: most records change none of it, and then nothing is asked
    before = (s.status, s.waiting_for, s.review, s.commit, s.merged)
    was_parked = s.parked
    _apply(s, ev)
    if s.parked and not was_parked:
        # a follow-up that reopens a completed session is itself what must wake it
        s.parked_at = record.seq - 1 if isinstance(ev, HumanMessage) else record.seq
    after = (s.status, s.waiting_for, s.review, s.commit, s.merged)
    if after != before and (after[:2], _needs_person(*after)) != (before[:2], _needs_person(*before)):
        _attention(s, ts)


# what `_apply` only counts, or passes over (by exact type: no event class derives from another)
_COUNTERS = frozenset({ModelResponded, ToolCallStarted, MessageDelivered})


def _needs_person(status: str, waiting_for: str, review: bool, commit: str, merged: str) -> bool:
    if status in _ATTENTION:
        return True
    if status == "completed":  # a branch waiting for a person's review
        return review and bool(commit) and not merged
    return status == "waiting" and waiting_for == "answer"


def _attention(s: SessionState, ts: float) -> None:
    """A move into a state that needs a person starts a new wait (and undoes an earlier dismissal)."""
    if s.needs_person_now():
        s.attention_since, s.dismissed = ts, False
    else:
        s.attention_since = 0.0


def _apply(s: SessionState, ev: object) -> None:
    if s.terminal:
        # Nothing changes a finished session's outcome (later events are still counted), except a
        # follow-up that reopens a completed one, and someone dismissing it from the inbox.
        match ev:
            case HumanMessage(mode="queue") if s.status == "completed":
                s.status, s.reason, s.result, s.turn = "queued", "follow-up", "", s.turn + 1
                s.round += 1
                s.turn_round = s.round
                s.parked, s.owner = True, None
            case InboxDismissed():
                s.dismissed = True
            case BranchMerged(result=result):
                s.merged = result
        return
    # The kinds a long log is made of come first: `match` tries each case in turn, and no event
    # class derives from another (tests/test_messages.py holds that), so the order changes nothing else.
    match ev:
        case ModelResponded(usage=usage, cost_usd=cost):
            s.steps += 1
            s.usage = _add(s.usage, usage)
            s.cost_usd += cost
        case ToolCallCompleted(tool_use_id=call):
            s.tool_calls += 1
            if call == s.tool_use_id:
                s.waiting_for, s.question, s.tool_use_id = "", "", ""
        case ToolCallStarted() | MessageDelivered():
            pass
        case SessionCreated(task=task) if s.events == 1:  # only the first record creates a session
            s.status = "pending" if task.pool is None else s.status
            s.pool = task.pool or s.pool
            s.prompt = task.prompt[:200]
            s.submitter = task.submitter
            s.parent_session = task.parent_session
            s.depth = task.depth
            s.created_ts = ev.ts
            s.trace_id = ev.trace_id
        case Routed(pool=pool):
            s.pool = pool
            s.status = "queued"
        case SessionClaimed(worker=worker, round=rnd):
            s.owner = worker
            s.round = rnd
            s.status = "running"
            s.parked, s.waiting_for, s.question, s.tool_use_id = False, "", "", ""
        case StatusChanged(status=status, reason=reason, worker=worker):
            s.status = status
            s.reason = reason
            s.owner = worker or s.owner
            if status == "running":
                s.parked, s.waiting_for = False, ""
        case ToolCallParked(waiting_for=what, tool_use_id=call, detail=detail):
            s.status = "awaiting_approval" if what == "approval" else "waiting"
            s.parked, s.waiting_for, s.tool_use_id = True, what, call
            s.reason = {"answer": "waiting for an answer", "approval": "waiting for an approval"}.get(
                what, f"waiting for subtask {detail}"
            )
        case QuestionAsked(text=text):
            s.question = text
        case ApprovalRequested(name=name, input=inp):
            s.question = f"{name} {json.dumps(inp, sort_keys=True)[:300]}"
        case SessionPaused(reason=reason, detail=detail):
            s.status = "paused"
            s.reason = f"{reason}: {detail}" if detail else reason
            # an interrupted session goes on when someone speaks to it, not only on `resume`
            s.parked = reason == "interrupted"
        case InboxDismissed():
            s.dismissed = True
        case BranchCreated(repo=repo, branch=branch, base=base, review=review):
            s.repo, s.branch, s.base, s.review = repo, branch, base, review
        case ChangesCommitted(commit=commit, files_changed=files, insertions=ins, deletions=dels):
            s.commit, s.files_changed, s.insertions, s.deletions = commit, files, ins, dels
            s.merged = ""  # new work on the branch is not what was merged
        case BranchMerged(result=result):
            s.merged = result
        case DelegationRequested(child_session=child):
            s.children = (*s.children, child)
        case VerdictRecorded(round=rnd, verdict=verdict, usage=usage, cost_usd=cost):
            s.round = rnd
            s.reason = f"round {rnd}: {verdict}"
            s.usage = _add(s.usage, usage)
            s.cost_usd += cost
        case RevisionRequested(round=rnd):
            s.round = rnd
            s.status = "queued"
        case BudgetExceeded(limit=limit, detail=detail):
            s.status = "paused"
            s.reason = f"{limit}: {detail}" if detail else limit
        case CancelRequested(author=author, reason=why) if (
            s.created_ts
            and s.owner is None
            and s.status
            in (
                "pending",
                "queued",
            )
        ):
            # nobody has the session: the request itself ends it (an agent that takes it later stops at once)
            s.status, s.cancel_requested = "cancelled", True
            s.reason = f"cancelled by {author or 'someone'} before any agent took it" + (f": {why}" if why else "")
            s.parked = False
        case CancelRequested():
            s.cancel_requested = True
        case ResumeRequested():
            if s.status == "paused":
                s.status, s.reason = "queued", ""
        case SessionEnded(status=status, reason=reason, result=result):
            s.status = status
            s.reason = reason
            s.result = result
            s.parked, s.waiting_for = False, ""
        case _:
            pass


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cache_creation_input_tokens=a.cache_creation_input_tokens + b.cache_creation_input_tokens,
        cache_read_input_tokens=a.cache_read_input_tokens + b.cache_read_input_tokens,
    )
