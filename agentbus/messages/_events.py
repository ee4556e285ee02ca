"""The session events: a tagged union on `type`, every event named in the past tense."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from agentbus.messages._payloads import Budget, Status, Task, Usage
from agentbus.messages._wire import EpochSeconds, Version, now, version


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every session event.

    `id` is unique within the session and deterministic for steps an agent may
    redo (so a replayed append deduplicates). `ts` is the writer's clock in seconds since
    the epoch, for people and wall-clock budgets; ordering comes from the stream sequence.
    An event read without `ts` takes the time the stream stored it.
    """

    id: str
    ts: EpochSeconds = msgspec.field(default_factory=now)
    v: Version = msgspec.field(default_factory=version)


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
