"""Session state: a pure fold over a session's events (cached in KV by `SessionLog.state`)."""

from __future__ import annotations

import msgspec

from agentbus.messages import (
    TERMINAL,
    BudgetExceeded,
    CancelRequested,
    DelegationRequested,
    ModelResponded,
    Record,
    ResumeRequested,
    RevisionRequested,
    Routed,
    SessionClaimed,
    SessionCreated,
    SessionEnded,
    Status,
    StatusChanged,
    ToolCallCompleted,
    Usage,
    VerdictRecorded,
)


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
    created_ts: float = 0.0
    updated_ts: float = 0.0
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

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def fold(state: SessionState, record: Record) -> SessionState:
    """Apply one record; records at or below `last_seq` are ignored, so folding twice is harmless."""
    if record.seq <= state.last_seq:
        return state
    s = msgspec.structs.replace(state, last_seq=record.seq, events=state.events + 1)
    ev = record.event
    ts = getattr(ev, "ts", 0.0) or s.updated_ts
    s.updated_ts = max(s.updated_ts, ts)
    if s.terminal:
        # Nothing changes a finished session's outcome; later events are still counted.
        return s
    match ev:
        case SessionCreated(task=task) if state.events == 0:  # only the first record creates a session
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
        case StatusChanged(status=status, reason=reason, worker=worker):
            s.status = status
            s.reason = reason
            s.owner = worker or s.owner
        case ModelResponded(usage=usage, cost_usd=cost):
            s.steps += 1
            s.usage = Usage(
                input_tokens=s.usage.input_tokens + usage.input_tokens,
                output_tokens=s.usage.output_tokens + usage.output_tokens,
                cache_creation_input_tokens=s.usage.cache_creation_input_tokens + usage.cache_creation_input_tokens,
                cache_read_input_tokens=s.usage.cache_read_input_tokens + usage.cache_read_input_tokens,
            )
            s.cost_usd += cost
        case ToolCallCompleted():
            s.tool_calls += 1
        case DelegationRequested(child_session=child):
            s.children = (*s.children, child)
        case VerdictRecorded(round=rnd, verdict=verdict):
            s.round = rnd
            s.reason = f"round {rnd}: {verdict}"
        case RevisionRequested(round=rnd):
            s.round = rnd
            s.status = "queued"
        case BudgetExceeded(limit=limit, detail=detail):
            s.status = "paused"
            s.reason = f"{limit}: {detail}" if detail else limit
        case CancelRequested():
            s.cancel_requested = True
        case ResumeRequested():
            if s.status == "paused":
                s.status, s.reason = "queued", ""
        case SessionEnded(status=status, reason=reason, result=result):
            s.status = status
            s.reason = reason
            s.result = result
        case _:
            pass
    return s
