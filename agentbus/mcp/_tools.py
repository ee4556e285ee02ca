"""The tools `agentbus mcp` offers: each an argument Struct (its JSON Schema and its validation), a
description written for the calling model, and a handler on a connected `Client`.

A handler returns a `Reply`: structured content (a JSON object) and a short text form. An error is
raised as an `AgentBusError` and becomes a tool error carrying the CLI's exit code (`_server.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from agentbus.errors import Timeout, UsageError
from agentbus.messages import Budget, Record, SessionEnded, event_type, to_builtins

if TYPE_CHECKING:
    from agentbus.client import Client
    from agentbus.state import SessionState

MAX_WAIT_S = 600.0  # what `submit`'s and `result`'s waits may ask for: one tool call, not a watch
EVENTS_LIMIT = 500
EVENT_TEXT = 4_000  # characters of one event's text kept in `events` (the full record is in `show`)

INSTRUCTIONS = """\
agentbus runs tasks on teams of agents. A task becomes a *session*: a durable log of every step \
(model replies, tool calls, people's messages) that any number of agents and people can follow.

How to succeed:
1. `pools` lists the pools: named groups of agents (each with its own model and tools) that run \
sessions. Pick one that is served (it has agents or a supervisor), or leave `pool` out to let the \
router choose.
2. `submit` records the task and returns its session id at once; pass `wait` (seconds) to wait for \
the end as well. Budgets (`max_steps`, `max_usd`, ...) cap what the session may spend: when one \
is reached the session *pauses* (it does not fail), and `resume` with a higher limit continues it.
3. Follow with `events`: pass the `next_after` of the previous call as `after` and you see every \
event exactly once. `result` waits (bounded) for the end and returns the result.
4. Steer with `say` (the agent reads it at its next step; `queue` holds it until the agent would \
finish), stop with `interrupt` or `cancel`.
5. When a session waits for a person (an agent asked a question, a tool call waits for approval, a \
budget paused it), it is in `inbox`. Answer a question with `say`; ask the person you work for \
before you `approve` a tool call or raise a budget with `resume`, unless they told you to decide.
Errors carry an exit_code as the agentbus CLI's: 2 bad argument, 3 no such session, 4 NATS \
unreachable, 5 ended without success or timed out, 6 not permitted (the message names your role).
"""

SessionId = Annotated[str, msgspec.Meta(description="A session id, as `submit` or `sessions` returned it.")]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT_S)]


class _Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Arguments of one tool; unknown fields are refused, so a misspelt argument is an error."""


class _Limits(_Args, frozen=True, kw_only=True):
    max_steps: Annotated[int | None, msgspec.Meta(description="Model turns the session may take.")] = None
    max_tool_calls: Annotated[int | None, msgspec.Meta(description="Tool calls it may make.")] = None
    max_tokens: Annotated[
        int | None, msgspec.Meta(description="Tokens it may use (input, cache write, cache read and output).")
    ] = None
    max_usd: Annotated[float | None, msgspec.Meta(description="Dollars it may spend.")] = None
    max_wall_s: Annotated[float | None, msgspec.Meta(description="Seconds since submission it may run.")] = None

    def budget(self) -> Budget:
        from agentbus.budget import LIMITS, check

        values: dict[str, Any] = {}
        for limit in LIMITS:
            raw = getattr(self, limit.field)
            if raw is not None:
                values[limit.field] = check(limit, raw)
        return Budget(**values)


def _doc(text: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **constraints)


class SubmitArgs(_Limits, frozen=True, kw_only=True):
    prompt: Annotated[str, _doc("The task, self-contained: the agent sees nothing else.")]
    pool: Annotated[str | None, _doc("Pool to run it on (see `pools`); default: the router chooses.")] = None
    criteria: Annotated[
        list[str],
        _doc("Criteria a separate grader checks the result against; it is sent back with a critique until they hold."),
    ] = []
    checks: Annotated[
        list[str], _doc("Shell commands that must exit 0 in the session's workspace for the result to pass.")
    ] = []
    max_rounds: Annotated[int, _doc("Grading rounds before the session fails.", ge=1)] = 3
    approve: Annotated[list[str], _doc("Tools (e.g. bash) whose every call waits for a person's approval.")] = []
    wait: Annotated[
        float, _doc("Seconds to wait for the session to end (0: return at once with its id).", ge=0, le=MAX_WAIT_S)
    ] = 0


class ResultArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    timeout: Annotated[
        float, _doc("Seconds to wait for the end; then the status so far (done false).", ge=0, le=MAX_WAIT_S)
    ] = 60


class EventsArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    after: Annotated[
        int, _doc("Events after this sequence number: 0 for the start, else the `next_after` you got last.", ge=0)
    ] = 0
    limit: Annotated[int, _doc("At most this many events.", ge=1, le=EVENTS_LIMIT)] = 50
    wait: Annotated[
        float, _doc("If nothing follows `after` yet, wait this many seconds for the next event.", ge=0, le=60)
    ] = 0


class SayArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    text: Annotated[str, _doc("What to tell the agent (or the answer to its question).")]
    queue: Annotated[
        bool, _doc("Hold it until the agent would end its turn (a follow-up; reopens a completed session).")
    ] = False
    display_name: Annotated[
        str | None, _doc("A name shown beside the message (your credentials identify you either way).")
    ] = None


class InterruptArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    text: Annotated[str, _doc("What to do instead; without it the session pauses until someone speaks to it.")] = ""


class ApproveArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    call_id: Annotated[
        str | None, _doc("The tool call to decide (from `inbox` or `events`); needed only when several wait.")
    ] = None
    deny: Annotated[bool, _doc("Deny instead of approve.")] = False
    reason: Annotated[str, _doc("Why; the agent reads it when the call is denied.")] = ""


class CancelArgs(_Args, frozen=True, kw_only=True):
    session_id: SessionId
    reason: Annotated[str, _doc("Why, for the log.")] = ""


class ResumeArgs(_Limits, frozen=True, kw_only=True):
    session_id: SessionId


class SessionsArgs(_Args, frozen=True, kw_only=True):
    status: Annotated[
        str | None,
        _doc("Only sessions with this status: queued, running, waiting, awaiting_approval, evaluating, paused, "
             "completed, failed or cancelled."),
    ] = None  # fmt: skip
    limit: Annotated[int, _doc("The newest this many.", ge=1, le=500)] = 50


class NoArgs(_Args, frozen=True, kw_only=True):
    pass


@dataclass(frozen=True)
class Reply:
    """What a tool returns: structured content for programs, a short text for the model's reading."""

    data: dict[str, Any]
    text: str


Handler = Callable[["Client", Any], Awaitable[Reply]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    args: type[_Args]
    handler: Handler
    read_only: bool = False
    destructive: bool = False

    def input_schema(self) -> dict[str, Any]:
        """The JSON Schema of the arguments, inlined (no $ref), without the Struct's own title."""
        schema: dict[str, Any] = msgspec.json.schema(self.args)
        body: dict[str, Any] = dict(schema["$defs"][self.args.__name__])
        for key in ("title", "description"):
            body.pop(key, None)
        body.setdefault("required", [])
        body["additionalProperties"] = False
        return body


# --- results as data --------------------------------------------------------------------------


def state_data(state: SessionState) -> dict[str, Any]:
    """The fields a caller acts on (the whole fold is in the session resource)."""
    return {
        "session_id": state.session_id,
        "status": state.status,
        "done": state.terminal,
        "pool": state.pool,
        "result": state.result,
        "reason": state.reason,
        "steps": state.steps,
        "tool_calls": state.tool_calls,
        "cost_usd": round(state.cost_usd, 6),
        "last_seq": state.last_seq,
        "question": state.question,
        "waiting_for": state.waiting_for,
    }


def state_text(state: SessionState) -> str:
    line = f"session {state.session_id}: {state.status}" + (f" ({state.reason})" if state.reason else "")
    line += f", {state.steps} steps, ${state.cost_usd:.4f}"
    if state.question:
        line += f"\nwaits for a person: {state.question}"
    if state.result:
        line += f"\nresult:\n{state.result}"
    return line


def event_data(record: Record) -> dict[str, Any]:
    """One record: where it sits, who wrote it, what it says (long texts cut)."""
    event = to_builtins(record.event)
    if not isinstance(event, dict):
        event = {"value": event}
    out = {"seq": record.seq, "channel": record.channel, "sender": record.sender, **_cut(event)}
    out["type"] = event_type(record.event)
    return out


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > EVENT_TEXT:
        return value[:EVENT_TEXT] + f"... [{len(value) - EVENT_TEXT} more characters; `agentbus show` has them]"
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value


# --- handlers ---------------------------------------------------------------------------------


async def _settle(client: Client, sid: str, timeout: float) -> SessionState:
    """The state once the session ends or pauses, or as it stands after `timeout` seconds."""
    if timeout <= 0:
        return await client.state(sid)
    with contextlib.suppress(Timeout):
        return await client.wait(sid, timeout=timeout)
    return await client.state(sid)


async def submit(client: Client, a: SubmitArgs) -> Reply:
    sid = await client.submit(
        a.prompt, pool=a.pool, criteria=a.criteria, checks=a.checks, max_rounds=a.max_rounds, budget=a.budget(),
        approve=a.approve,
    )  # fmt: skip
    served = True if a.pool is None else await client.serves(a.pool)
    state = await _settle(client, sid, a.wait)
    data = {**state_data(state), "pool_served": served}
    text = f"submitted session {sid}"
    if not served:
        text += f"; WARNING: nothing serves pool {a.pool} now, so it waits until an agent of that pool starts"
    if a.wait:
        text += "\n" + state_text(state)
    else:
        text += f" ({state.status}). Follow it with events(session_id={sid!r}, after=0) or wait with result."
    return Reply(data, text)


async def result(client: Client, a: ResultArgs) -> Reply:
    state = await _settle(client, a.session_id, a.timeout)
    settled = state.terminal or state.status == "paused"
    text = state_text(state)
    if not settled:
        text += f"\nstill {state.status} after {a.timeout:g}s: call result again, or follow with events"
    return Reply(state_data(state), text)


async def events(client: Client, a: EventsArgs) -> Reply:
    records = (
        await client.log.read(a.session_id, from_seq=a.after + 1, limit=a.limit)
        if await _exists(client, a.session_id)
        else []
    )
    if not records and a.wait > 0:
        records = await _next_records(client, a.session_id, a.after, a.wait)
    from agentbus.render import record_line

    next_after = records[-1].seq if records else a.after
    ended = any(isinstance(r.event, SessionEnded) for r in records)
    data = {
        "session_id": a.session_id,
        "events": [event_data(r) for r in records],
        "next_after": next_after,
        "more": len(records) >= a.limit,
    }
    lines = [record_line(r) for r in records] or [f"no events after #{a.after} yet"]
    hint = "more follow: call again" if data["more"] else "call again"
    lines.append(
        f"next_after={next_after} ({hint} with after={next_after})" + (" [the session ended]" if ended else "")
    )
    return Reply(data, "\n".join(lines))


async def _exists(client: Client, sid: str) -> bool:
    from agentbus.errors import NoSuchSession
    from agentbus.subjects import valid_token

    if not valid_token(sid):  # a malformed id is a usage error, not "no such session"
        raise UsageError(f"session id {sid!r} must be 1-64 characters of letters, digits, '-' or '_'")
    if not await client.log.exists(sid):
        raise NoSuchSession(sid)
    return True


async def _next_records(client: Client, sid: str, after: int, wait: float) -> list[Record]:
    """The first record after `after` (and any already there with it), waiting up to `wait` seconds."""
    out: list[Record] = []

    async def first() -> None:
        async with contextlib.aclosing(client.log.tap(sid, start=after + 1, follow=True)) as records:
            async for rec in records:
                out.append(rec)
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first(), wait)
    return out


async def say(client: Client, a: SayArgs) -> Reply:
    seq = await client.say(a.session_id, a.text, author=a.display_name, queue=a.queue)
    how = "queued as a follow-up" if a.queue else "sent; the agent reads it at its next step"
    return Reply({"session_id": a.session_id, "seq": seq, "queued": a.queue}, f"message #{seq} {how}")


async def interrupt(client: Client, a: InterruptArgs) -> Reply:
    seq = await client.interrupt(a.session_id, a.text)
    then = "it goes on with your text" if a.text else "it pauses until someone says something or resumes it"
    return Reply({"session_id": a.session_id, "seq": seq}, f"interrupt #{seq} sent; {then}")


async def approve(client: Client, a: ApproveArgs) -> Reply:
    seq, call = await client.approve(a.session_id, a.call_id, deny=a.deny, reason=a.reason)
    verdict = "denied" if a.deny else "approved"
    data = {"session_id": a.session_id, "seq": seq, "call_id": call, "approved": not a.deny}
    return Reply(data, f"{verdict} {call} (#{seq})")


async def cancel(client: Client, a: CancelArgs) -> Reply:
    seq = await client.cancel(a.session_id, reason=a.reason)
    return Reply({"session_id": a.session_id, "seq": seq}, f"cancel requested (#{seq}); it stops at its next step")


async def resume(client: Client, a: ResumeArgs) -> Reply:
    seq = await client.resume(a.session_id, budget=a.budget())
    return Reply({"session_id": a.session_id, "seq": seq}, f"resumed (#{seq}); it is queued on its pool again")


async def inbox(client: Client, a: NoArgs) -> Reply:
    items = [i async for i in client.inbox()]
    data = {"items": [{**to_builtins(i), "waiting_s": round(i.waiting_s, 1)} for i in items]}
    lines = [f"{i.session_id} {i.status}: {i.why}  -> {i.command}" for i in items]
    return Reply(data, "\n".join(lines) or "nothing needs a person")


async def sessions(client: Client, a: SessionsArgs) -> Reply:
    from agentbus.cli.sessions import STATUSES

    if a.status is not None and a.status not in STATUSES:
        raise UsageError(f"unknown status {a.status!r}; valid: {', '.join(STATUSES)}")
    states = (await client.sessions(status=a.status))[-a.limit :]
    data = {"sessions": [state_data(s) for s in states]}
    lines = [f"{s.session_id} {s.status:<17} pool={s.pool or '-'} steps={s.steps} ${s.cost_usd:.4f}" for s in states]
    return Reply(data, "\n".join(lines) or "no sessions")


async def pools(client: Client, a: NoArgs) -> Reply:
    infos = await client.pools()
    data = {"pools": [{
        "name": p.name, "served": p.served, "workers": len(p.workers), "free_slots": p.free_slots,
        "waiting": p.waiting, "in_flight": p.in_flight, "supervised": bool(p.supervisors),
    } for p in infos]}  # fmt: skip
    lines = [
        f"{p.name}: {'served' if p.served else 'NOT served'}, {len(p.workers)} agents, {p.free_slots} free slots, "
        f"{p.waiting} waiting" + (", a supervisor starts agents on demand" if p.supervisors else "")
        for p in infos
    ]
    return Reply(data, "\n".join(lines) or "no pools known yet (nothing has served or been sent work)")


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec("submit", "Submit a task", (
        "Run a task on a pool of agents as a new session. Returns the session id at once (status queued) unless "
        "`wait` is given: then it waits that many seconds for the end and returns the result too. Budgets cap the "
        "session; reaching one pauses it (see `resume`). Use `pools` first to pick a pool."
    ), SubmitArgs, submit),
    ToolSpec("result", "Wait for a result", (
        "Wait (at most `timeout` seconds) until a session ends or pauses, and return its status and result. If it "
        "is still running, `done` is false: call again, or follow it with `events`."
    ), ResultArgs, result, read_only=True),
    ToolSpec("events", "Read a session's events", (
        "A slice of a session's log in order: model replies, tool calls and results, people's messages, the end. "
        "Pass after=0 first, then the `next_after` you got, to see every event exactly once; `wait` waits for the "
        "next one when there is none yet."
    ), EventsArgs, events, read_only=True),
    ToolSpec("say", "Steer a session", (
        "Send a message to the agent running a session: it reads it at its next step (this is also how to answer "
        "a question it asked). With `queue` it is held until the agent would finish, and then continues the "
        "session (this reopens a completed session for another turn)."
    ), SayArgs, say),
    ToolSpec("interrupt", "Interrupt a session", (
        "Stop what a session is doing now (the model call or tool in flight). With `text` it goes on with that; "
        "without, it pauses until someone speaks to it or resumes it."
    ), InterruptArgs, interrupt),
    ToolSpec("approve", "Approve a tool call", (
        "Approve or deny a tool call that waits for a person's approval (see `inbox`). Ask the person you work "
        "for first unless they told you to decide."
    ), ApproveArgs, approve),
    ToolSpec("cancel", "Cancel a session", "Stop a session for good at its next step; it ends cancelled.",
             CancelArgs, cancel, destructive=True),
    ToolSpec("resume", "Resume a paused session", (
        "Continue a paused session (a budget was reached, or it was interrupted), raising the limits you name. "
        "Raising a budget spends more money: ask the person you work for first."
    ), ResumeArgs, resume),
    ToolSpec("inbox", "Sessions that need a person", (
        "The sessions waiting for a person: a question to answer (`say`), a tool call to approve (`approve`), a "
        "pause (`resume`), a failure to look at. Each item says what to do."
    ), NoArgs, inbox, read_only=True),
    ToolSpec("sessions", "List sessions", "Sessions you may see, oldest first, with status, pool, steps and cost.",
             SessionsArgs, sessions, read_only=True),
    ToolSpec("pools", "List pools", (
        "The pools that exist: named groups of agents, each with its own model and tools, that run sessions. "
        "Says whether each is served (agents running, or a supervisor that starts them), its free slots and the "
        "tasks waiting."
    ), NoArgs, pools, read_only=True),
)  # fmt: skip
BY_NAME = {t.name: t for t in TOOLS}
