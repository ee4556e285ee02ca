"""Wire types: the task and the session events, as frozen msgspec Structs.

Rules that keep old and new processes talking: every field added later has a
default, no field ever changes type, and an event type this version does not
know decodes to `UnknownEvent` instead of failing. Events are named in the past
tense; `SCHEMA_VERSION` goes up when an event type is added.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1

Status = Literal[
    "pending",  # recorded, not yet routed
    "queued",  # on a pool's work queue
    "running",  # an agent is working on it
    "waiting",  # parked until a person answers (ask_human) or a delegated subtask ends
    "awaiting_approval",  # parked until a person approves or denies a tool call
    "evaluating",  # the evaluator is grading the result
    "paused",  # a budget, a guard or an interrupt stopped it; `resume` (or a message) continues
    "completed",
    "failed",
    "cancelled",
]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class Budget(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Limits for one session; None means no limit."""

    max_steps: int | None = None
    max_tool_calls: int | None = None
    max_tokens: int | None = None
    max_usd: float | None = None
    max_wall_s: float | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Token usage of one model call; prompt size is the sum of the three input kinds."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


class Task(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What someone asked for: the unit that routers route and agents work on."""

    session_id: str
    prompt: str
    pool: str | None = None
    criteria: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    max_rounds: int = 3
    budget: Budget = Budget()
    tags: tuple[str, ...] = ()
    submitter: str = ""
    parent_session: str | None = None
    depth: int = 0
    model: str | None = None
    opinions: tuple[str, ...] = ()  # fan-out: one sibling session per entry, on that pool ("" lets the router pick)
    approve: tuple[str, ...] = ()  # tools whose calls wait for a person, on top of the pool's list
    v: int = SCHEMA_VERSION
    base: str | None = None  # a pool on a repository: the ref its branch starts from (default: the pool's base)


class WorkItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message on a work or submission queue: a pointer to a session, plus why it is queued.

    The queue message is small on purpose: the session log holds the task, so an
    agent that picks this up reads the log and continues from where it stands.
    """

    session_id: str
    # wake: a person answered a parked session; child_result: a delegated subtask ended;
    # timeout: an approval waited longer than its pool allows
    reason: Literal["new", "revision", "resume", "child_result", "evaluate", "wake", "timeout"] = "new"
    round: int = 1
    v: int = SCHEMA_VERSION


class Timer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A wake-up due at `due_ts` for one parked session (an approval's timeout), on the timers queue."""

    session_id: str
    due_ts: float
    tool_use_id: str = ""
    round: int = 1
    v: int = SCHEMA_VERSION


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An agent's entry in the worker registry, refreshed by its heartbeat."""

    worker_id: str
    pool: str
    model: str = ""
    host: str = ""
    pid: int = 0
    container: str = ""
    sessions: tuple[str, ...] = ()
    started_ts: float = 0.0
    heartbeat_ts: float = 0.0
    allowed_models: tuple[str, ...] = ()  # models a submitter may choose besides `model` (--allow-model)
    v: int = SCHEMA_VERSION
    concurrency: int = 0  # sessions it runs at once (0: an agent too old to say)
    repo: str = ""  # the repository its sessions work on (agent --repo), as this agent sees the path
    base: str = ""  # the ref their branches start from unless a task names another


class SupervisorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A supervisor's announcement, refreshed by its heartbeat: the pools it starts workers for."""

    supervisor_id: str
    pools: tuple[str, ...] = ()  # pools of its file it may start workers in (max > 0)
    host: str = ""
    pid: int = 0
    started_ts: float = 0.0
    heartbeat_ts: float = 0.0
    v: int = SCHEMA_VERSION


class ScaleRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask the supervisor for `count` more workers in `pool` (a command: imperative name)."""

    pool: str
    count: int = 1
    reason: str = ""
    requester: str = ""


class ScaleReply(msgspec.Struct, frozen=True, kw_only=True):
    """The supervisor's answer to a `ScaleRequest`: how many workers it started, and why not more."""

    granted: int
    reason: str = ""


class PoolSpend(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Dollars a pool's model calls have cost since `since_ts` (the last reset)."""

    pool: str
    usd: float = 0.0
    calls: int = 0
    since_ts: float = 0.0
    updated_ts: float = 0.0
    v: int = SCHEMA_VERSION


class Hold(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Set by the supervisor on a pool over its (or the fleet's) dollar ceiling: no model call runs."""

    limit: str  # pool_ceiling_usd or fleet_ceiling_usd
    detail: str
    set_ts: float = 0.0
    v: int = SCHEMA_VERSION


# --- session events ---------------------------------------------------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every session event.

    `id` is unique within the session and deterministic for steps an agent may
    redo (so a replayed append deduplicates). `ts` is the writer's clock, for
    people; ordering comes from the stream sequence.
    """

    id: str
    ts: float = msgspec.field(default_factory=time.time)
    v: int = SCHEMA_VERSION


class SessionCreated(Event, tag="session_created", frozen=True, kw_only=True):
    """Someone submitted a task: always the first event of a session (id `created`)."""

    task: Task
    trace_id: str | None = None


class Routed(Event, tag="routed", frozen=True, kw_only=True):
    """The session was put on a pool's queue: by its submitter (rule `explicit`) or a router rule."""

    pool: str
    rule: str = "explicit"
    model: str | None = None


class HumanMessage(Event, tag="human_message", frozen=True, kw_only=True):
    """A person or script said something to the session.

    `steer` reaches the model at its next step; `queue` waits until the model would end its
    turn, and the session continues with it instead of ending (on a completed session it
    reopens the conversation for another turn).
    """

    text: str
    author: str
    mode: Literal["steer", "queue"] = "steer"


class InterruptRequested(Event, tag="interrupt_requested", frozen=True, kw_only=True):
    """Stop now: the model call in flight is cancelled, or the running tool killed. With `text` the
    conversation goes on with it; without, the session pauses (reason `interrupted`)."""

    author: str
    text: str = ""


class MessageDelivered(Event, tag="message_delivered", frozen=True, kw_only=True):
    """A receipt: the human message at `message_seq` went into the model request of `step`."""

    message_seq: int
    message_id: str = ""
    step: int


class ApprovalRequested(Event, tag="approval_requested", frozen=True, kw_only=True):
    """A tool call that waits for a person before it runs (its tool is on the approve list)."""

    step: int
    tool_use_id: str
    name: str
    input: dict[str, Any] = {}
    timeout_s: float | None = None
    on_timeout: Literal["deny", "pause"] = "deny"


class ApprovalDecided(Event, tag="approval_decided", frozen=True, kw_only=True):
    """A person approved or denied a tool call (or its timeout denied it); `author` is who decided."""

    tool_use_id: str
    approved: bool
    author: str
    reason: str = ""


class ToolCallParked(Event, tag="tool_call_parked", frozen=True, kw_only=True):
    """A tool call waits for something outside the agent; the session holds no agent slot meanwhile.

    `waiting_for` is `answer` (ask_human), `approval`, or `subtask` (delegate; `detail` names the child).
    The answer, the decision or the child's end queues the session again.
    """

    step: int
    tool_use_id: str
    name: str
    waiting_for: Literal["answer", "approval", "subtask"]
    detail: str = ""


class SessionPaused(Event, tag="session_paused", frozen=True, kw_only=True):
    """The session stopped for a reason other than a budget (an interrupt, an approval's timeout);
    `resume` or a message continues it."""

    reason: str
    detail: str = ""
    author: str = ""


class InboxDismissed(Event, tag="inbox_dismissed", frozen=True, kw_only=True):
    """Someone looked at the session in the inbox; it leaves every inbox until it next needs a person."""

    author: str
    note: str = ""


class CancelRequested(Event, tag="cancel_requested", frozen=True, kw_only=True):
    """Someone asked the session to stop; its owner ends it `cancelled` at the next step boundary."""

    author: str
    reason: str = ""


class ResumeRequested(Event, tag="resume_requested", frozen=True, kw_only=True):
    """Someone continued a paused session, raising the limits in `budget` (None fields keep theirs)."""

    author: str
    budget: Budget = Budget()


class StatusChanged(Event, tag="status_changed", frozen=True, kw_only=True):
    """The session moved to `status` for a reason worth showing (waiting for a person, evaluating, ...)."""

    status: Status
    reason: str = ""
    worker: str | None = None


class SessionClaimed(Event, tag="session_claimed", frozen=True, kw_only=True):
    """An agent took the session's task off its pool's queue (attempt counts redeliveries)."""

    worker: str
    attempt: int = 1
    round: int = 1
    workspace: str = ""  # where this agent keeps the session's files (the evaluator's checks run on a copy)


class ModelResponded(Event, tag="model_responded", frozen=True, kw_only=True):
    """One model call's response, recorded before any tool it asks for runs."""

    step: int
    model: str
    content: tuple[dict[str, Any], ...]
    stop_reason: str | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    round: int = 1
    # The last log sequence the request was built from: a human message recorded after it
    # (while the call was in flight) belongs after this response, not before it.
    horizon: int = 0


class ModelCallFailed(Event, tag="model_call_failed", frozen=True, kw_only=True):
    """A model call failed in a way that may pass (rate limit, overload, outage, unreachable API).

    The task goes back to the queue and is tried again after `retry_in_s`; `attempt` counts the
    deliveries so far. A failure that cannot pass ends the session instead.
    """

    step: int
    model: str
    error: str
    status: int | None = None
    attempt: int = 1
    retry_in_s: float = 0.0


class ToolCallStarted(Event, tag="tool_call_started", frozen=True, kw_only=True):
    """Written just before a tool runs; a start with no completion means the run was cut off."""

    step: int
    tool_use_id: str
    name: str
    input: dict[str, Any] = {}
    rerun: bool = False


class ToolCallCompleted(Event, tag="tool_call_completed", frozen=True, kw_only=True):
    """A tool's result (or error, with `is_error`), recorded before the model sees it."""

    step: int
    tool_use_id: str
    name: str
    output: str
    is_error: bool = False


class QuestionAsked(Event, tag="question_asked", frozen=True, kw_only=True):
    """The model asked the people watching a question (`ask_human`); the next human message answers it."""

    text: str
    tool_use_id: str = ""


class DelegationRequested(Event, tag="delegation_requested", frozen=True, kw_only=True):
    """The session started a child session (a `delegate` call, or one sibling of a fan-out)."""

    child_session: str
    pool: str | None
    prompt: str
    tool_use_id: str = ""


class DelegationCompleted(Event, tag="delegation_completed", frozen=True, kw_only=True):
    """A child session ended (or paused); its outcome as the parent received it."""

    child_session: str
    status: Status
    result: str = ""
    tool_use_id: str = ""


class OpinionResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One sibling's outcome inside `OpinionsAggregated`."""

    session_id: str
    pool: str
    status: str
    result: str = ""
    reason: str = ""


class OpinionsAggregated(Event, tag="opinions_aggregated", frozen=True, kw_only=True):
    """Every sibling of a fan-out ended; their results side by side, in the order they were asked for."""

    results: tuple[OpinionResult, ...]


class CheckResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One check command's outcome in a verdict (exit 0 passes; output capped)."""

    command: str
    passed: bool
    exit_code: int | None = None
    output: str = ""


class CriterionResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The grader's judgement of one criterion in a verdict."""

    criterion: str
    passed: bool
    score: float | None = None
    critique: str = ""


class VerdictRecorded(Event, tag="verdict_recorded", frozen=True, kw_only=True):
    """The evaluator's judgement of one round's result: every criterion and check, and the critique."""

    round: int
    verdict: Literal["satisfied", "needs_revision", "failed"]
    criteria: tuple[CriterionResult, ...] = ()
    checks: tuple[CheckResult, ...] = ()
    critique: str = ""
    # the grader's call, counted in the session's spend (not its steps)
    grader_model: str = ""
    usage: Usage = Usage()
    cost_usd: float = 0.0


class RevisionRequested(Event, tag="revision_requested", frozen=True, kw_only=True):
    """The evaluator sends the work back: `critique` becomes the next user turn of round `round`.

    With `fresh_start`, the agent drops the old conversation and starts over from the
    task plus `critique` (a summary of what failed so far) instead of patching it.
    """

    round: int
    critique: str
    fresh_start: bool = False


class BranchCreated(Event, tag="branch_created", frozen=True, kw_only=True):
    """The session works on a repository: its own worktree (the workspace) on a new branch from the base."""

    repo: str = ""  # the repository's top directory, as the agent sees it
    branch: str = ""  # agentbus/<session>
    base: str = ""  # the ref asked for (the pool's base, or submit --base)
    base_commit: str = ""  # what it resolved to when the branch was made
    worktree: str = ""
    review: bool = False  # the pool wants a person to review the branch (the inbox says so once it ends)


class ChangesCommitted(Event, tag="changes_committed", frozen=True, kw_only=True):
    """At the end of a round the agent committed what changed in the worktree on the session's branch.

    The counts and `stat` are the branch against `base_commit` at `commit`: what a reviewer sees.
    """

    repo: str = ""
    branch: str = ""
    commit: str = ""
    base: str = ""
    base_commit: str = ""
    round: int = 1
    files_changed: int = 0
    insertions: int = 0
    deletions: int = 0
    stat: str = ""  # `git diff --stat`, capped


class CommitFailed(Event, tag="commit_failed", frozen=True, kw_only=True):
    """Nothing was committed at the end of a round (nothing changed, a hook refused): the reason, kept."""

    reason: str = ""
    repo: str = ""
    branch: str = ""
    head: str = ""  # the branch's commit, unchanged
    round: int = 1


class BranchMerged(Event, tag="branch_merged", frozen=True, kw_only=True):
    """A person merged the session's branch into its base (`agentbus merge`); nothing merges by itself."""

    branch: str = ""
    commit: str = ""  # the branch's commit that was merged
    into: str = ""  # the branch merged into
    result: str = ""  # what `into` points at now (`commit` itself when fast-forwarded)
    fast_forward: bool = False
    author: str = ""


class BudgetExceeded(Event, tag="budget_exceeded", frozen=True, kw_only=True):
    """A limit stopped the session before its next model call; it is paused until `resume`."""

    limit: str  # max_steps, max_tokens, max_usd, max_wall, no_progress, ...
    detail: str = ""


class SessionEnded(Event, tag="session_ended", frozen=True, kw_only=True):
    """The session is over (id `ended`, so it is recorded once whoever writes it); nothing changes its outcome."""

    status: Literal["completed", "failed", "cancelled"]
    reason: str = ""
    result: str = ""


class InputRejected(Event, tag="input_rejected", frozen=True, kw_only=True):
    """Something addressed to this session could not be used; the reason is kept, nothing is dropped silently."""

    reason: str
    source: str = ""


AnyEvent = (
    SessionCreated
    | Routed
    | HumanMessage
    | InterruptRequested
    | MessageDelivered
    | ApprovalRequested
    | ApprovalDecided
    | ToolCallParked
    | SessionPaused
    | InboxDismissed
    | CancelRequested
    | ResumeRequested
    | StatusChanged
    | SessionClaimed
    | ModelResponded
    | ModelCallFailed
    | ToolCallStarted
    | ToolCallCompleted
    | QuestionAsked
    | DelegationRequested
    | DelegationCompleted
    | OpinionsAggregated
    | BranchCreated
    | ChangesCommitted
    | CommitFailed
    | BranchMerged
    | VerdictRecorded
    | RevisionRequested
    | BudgetExceeded
    | SessionEnded
    | InputRejected
)

EVENT_TYPES: dict[str, type[Event]] = {t.__struct_config__.tag: t for t in AnyEvent.__args__}


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event of a type this version does not know (written by a newer one): kept, not dropped."""

    type: str
    id: str = ""
    ts: float = 0.0
    v: int = 0
    data: dict[str, Any] = {}


class InvalidEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes in the log that are not an event at all; `reason` says why, `raw` starts the payload."""

    reason: str
    raw: str = ""
    id: str = ""
    ts: float = 0.0


LogEvent = AnyEvent | UnknownEvent | InvalidEvent


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the session log as read back: the event and where it sits in the stream."""

    seq: int
    session_id: str
    channel: str  # "log", "input" or "control"
    event: LogEvent
    # The authenticated user who wrote it, from the subject's last token (input and control
    # channels; "" on the log and on messages recorded before senders were in the subject).
    sender: str = ""


# --- encoding --------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_work_decoder = msgspec.json.Decoder(WorkItem)


def encode(obj: msgspec.Struct) -> bytes:
    if isinstance(obj, UnknownEvent):
        return _encoder.encode({**obj.data, "type": obj.type, "id": obj.id, "ts": obj.ts, "v": obj.v})
    return _encoder.encode(obj)


def decode_event(data: bytes) -> LogEvent:
    """Decode one log payload; never raises: unknown types and garbage come back as values."""
    try:
        return _event_decoder.decode(data)
    except msgspec.ValidationError as err:
        known_err = err
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        return InvalidEvent(reason=f"not JSON: {err}", raw=_preview(data))
    try:
        obj = _dict_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as err:
        return InvalidEvent(reason=f"not a JSON object: {err}", raw=_preview(data))
    kind = obj.get("type")
    if isinstance(kind, str) and kind not in EVENT_TYPES:
        return UnknownEvent(
            type=kind,
            id=str(obj.get("id", "")),
            ts=float(obj["ts"]) if isinstance(obj.get("ts"), int | float) else 0.0,
            v=int(obj["v"]) if isinstance(obj.get("v"), int) else 0,
            data={k: v for k, v in obj.items() if k not in ("type", "id", "ts", "v")},
        )
    return InvalidEvent(reason=f"invalid event: {known_err}", raw=_preview(data), id=str(obj.get("id", "")))


def session_id_of(data: bytes) -> str | None:
    """The session id a payload names, even if the rest of it is malformed (to record why it was dropped).

    None unless it is a JSON object whose `session_id` is a valid subject token.
    """
    try:
        obj = _dict_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    sid = obj.get("session_id")
    if isinstance(sid, str) and 0 < len(sid) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in sid):
        return sid
    return None


def decode_work(data: bytes) -> WorkItem:
    """A queue message's work item; raises `msgspec.MsgspecError` for anything else (deep nesting included)."""
    try:
        return _work_decoder.decode(data)
    except RecursionError as err:  # msgspec's answer to ~1,000 levels of nesting
        raise msgspec.DecodeError(f"nested too deeply: {err}") from err
    except UnicodeDecodeError as err:
        raise msgspec.DecodeError(f"not UTF-8: {err}") from err


def ended_id(turn: int) -> str:
    """The id of a session's `session_ended` event in `turn` (a follow-up reopens a completed
    session for another turn, which ends under a new id; within a turn every writer uses the same
    id, so the end is recorded once whoever writes it)."""
    return "ended" if turn <= 1 else f"ended-{turn}"


def text_of(content: Sequence[Mapping[str, Any]], sep: str = "") -> str:
    """The text blocks of a model reply's content, joined by `sep` and stripped."""
    return sep.join(str(b.get("text", "")) for b in content if b.get("type") == "text").strip()


def to_builtins(obj: msgspec.Struct) -> Any:
    """A JSON-ready dict of any event or record (for `--json` output)."""
    if isinstance(obj, UnknownEvent):
        return {**obj.data, "type": obj.type, "id": obj.id, "ts": obj.ts, "v": obj.v}
    if isinstance(obj, InvalidEvent):
        return {"type": "invalid", **msgspec.to_builtins(obj)}
    if isinstance(obj, Record):
        return {
            "seq": obj.seq,
            "session_id": obj.session_id,
            "channel": obj.channel,
            **({"sender": obj.sender} if obj.sender else {}),
            "event": to_builtins(obj.event),
        }
    return msgspec.to_builtins(obj)


def event_type(event: LogEvent) -> str:
    if isinstance(event, UnknownEvent):
        return event.type
    if isinstance(event, InvalidEvent):
        return "invalid"
    return str(event.__struct_config__.tag)


def _preview(data: bytes, limit: int = 200) -> str:
    return data[:limit].decode("utf-8", errors="replace")
