"""The payloads beside the session events: the task, queue items, timers, the registry, spend and scaling."""

from __future__ import annotations

from typing import Literal

import msgspec

from agentbus.messages._wire import EpochSeconds, EpochSecondsOrUnset, Seconds, Version, version

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
    max_wall_s: Seconds | None = None  # wall time since submission (`--max-wall`; a pause names it max_wall)


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
    v: Version = msgspec.field(default_factory=version)
    base: str | None = None  # a pool on a repository: the ref its branch starts from (default: the pool's base)


class Opening(msgspec.Struct, frozen=True, kw_only=True):
    """A fresh session's first two records, in the work item the router queues for it, so the
    agent that takes it need not read them back (`agentbus.openings`; subjects.md, "The opening"):

    - `created`: the `session_created` payload as the stream stores it, at `created_seq`, on the
      control channel of `sender`;
    - `routed`: the `routed` payload, at `routed_seq`, on the log channel, with nothing of the
      session's stored in between (the router fenced it on the whole session);
    - `mac`: HMAC-SHA256 of them under the deployment's work key, hex, which only roles that may
      write session logs can read.

    An agent uses it only if the MAC verifies, and claims the session fenced on `routed_seq` over
    the whole session: anything written since (a person's message, a cancel) makes it read instead.
    """

    created_seq: int
    sender: str
    created: msgspec.Raw
    routed_seq: int
    routed: msgspec.Raw
    mac: str


class WorkItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message on a work or submission queue: a pointer to a session, plus why it is queued.

    The queue message is small on purpose: the session log holds the task, so an agent that
    picks this up reads the log and continues from where it stands. The one exception is the
    router's item for a fresh session, which carries its signed `opening`.
    """

    session_id: str
    # wake: a person answered a parked session; child_result: a delegated subtask ended;
    # timeout: an approval waited longer than its pool allows
    reason: Literal["new", "revision", "resume", "child_result", "evaluate", "wake", "timeout"] = "new"
    round: int = 1
    opening: Opening | None = None
    v: Version = msgspec.field(default_factory=version)


class Timer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A wake-up due at `due_ts` for one parked session (an approval's timeout), on the timers queue."""

    session_id: str
    due_ts: EpochSeconds
    tool_use_id: str = ""
    round: int = 1
    v: Version = msgspec.field(default_factory=version)


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An agent's entry in the worker registry, refreshed by its heartbeat."""

    worker_id: str
    pool: str
    model: str = ""
    host: str = ""
    pid: int = 0
    container: str = ""
    sessions: tuple[str, ...] = ()
    started_ts: EpochSecondsOrUnset = 0.0
    heartbeat_ts: EpochSecondsOrUnset = 0.0
    allowed_models: tuple[str, ...] = ()  # models a submitter may choose besides `model` (--allow-model)
    v: Version = msgspec.field(default_factory=version)
    concurrency: int = 0  # sessions it runs at once (0: an agent too old to say)
    repo: str = ""  # the repository its sessions work on (agent --repo), as this agent sees the path
    base: str = ""  # the ref their branches start from unless a task names another


class SupervisorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A supervisor's announcement, refreshed by its heartbeat: the pools it starts workers for."""

    supervisor_id: str
    pools: tuple[str, ...] = ()  # pools of its file it may start workers in (max > 0)
    host: str = ""
    pid: int = 0
    started_ts: EpochSecondsOrUnset = 0.0
    heartbeat_ts: EpochSecondsOrUnset = 0.0
    v: Version = msgspec.field(default_factory=version)


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
    since_ts: EpochSecondsOrUnset = 0.0
    updated_ts: EpochSecondsOrUnset = 0.0
    v: Version = msgspec.field(default_factory=version)


class Hold(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Set by the supervisor on a pool over its (or the fleet's) dollar ceiling: no model call runs."""

    limit: str  # pool_ceiling_usd or fleet_ceiling_usd
    detail: str
    set_ts: EpochSecondsOrUnset = 0.0
    v: Version = msgspec.field(default_factory=version)
