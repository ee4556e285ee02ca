"""The verbs a person (or a script, or another agent) uses on a running session, each an event in its log.

- steer (`say`): reaches the model at its next step;
- follow-up (`say --queue`): waits until the model would end its turn, then the session goes on
  with it instead of ending; on a completed session it opens the next turn of the conversation;
- interrupt: stops the model call or tool in flight now; with text the session goes on with
  it, without it pauses (reason `interrupted`) until someone speaks or resumes it;
- approve / deny a tool call that waits for a person.

Every verb is refused, in one line, where nothing would read it (a session that ended, a call
that does not wait). Receipts are events too: `message_delivered` says which request carried a
message.
"""

from __future__ import annotations

import contextlib
import secrets
import time

from agentbus.errors import SessionUnsuccessful, UsageError
from agentbus.messages import (
    ApprovalDecided,
    ApprovalRequested,
    HumanMessage,
    InboxDismissed,
    InterruptRequested,
    MessageDelivered,
    Record,
    SessionEnded,
)
from agentbus.session import SessionLog
from agentbus.state import SessionState, fold


def new_event_id(kind: str) -> str:
    """An id for a one-off event (human message, cancel): unique, so never deduplicated away."""
    return f"{kind}-{time.time_ns():x}-{secrets.token_hex(3)}"


class Control:
    """Steering verbs on one session log."""

    def __init__(self, log: SessionLog) -> None:
        self.log = log

    async def say(self, session_id: str, text: str, *, author: str, queue: bool = False) -> int:
        """A human message (steer, or with `queue` a follow-up); returns its sequence in the log."""
        if not text.strip():
            raise UsageError("message is empty")
        state = await self.log.state(session_id)
        if state.terminal and not (queue and state.status == "completed"):
            # Recording it would look like success to the person typing, but nothing would read it.
            hint = "; `say --queue` continues a completed session" if state.status == "completed" else ""
            raise UsageError(f"session {session_id} already ended {state.status}; nobody would read this{hint}")
        if state.terminal and not state.pool:
            raise UsageError(f"session {session_id} ran on no pool (a fan-out); a follow-up has nowhere to run")
        event = HumanMessage(id=new_event_id("say"), text=text, author=author, mode="queue" if queue else "steer")
        return (await self.log.append(session_id, event, channel="input")).seq

    async def interrupt(self, session_id: str, text: str = "", *, author: str) -> int:
        """Stop what the session is doing now; with `text`, go on with it, else pause."""
        state = await self.log.state(session_id)
        if state.terminal:
            raise UsageError(f"session {session_id} already ended {state.status}; there is nothing to interrupt")
        event = InterruptRequested(id=new_event_id("interrupt"), author=author, text=text)
        return (await self.log.append(session_id, event, channel="input")).seq

    async def approve(
        self, session_id: str, call_id: str | None = None, *, author: str, deny: bool = False, reason: str = ""
    ) -> tuple[int, str]:
        """Decide a tool call that waits for a person; returns (sequence, the call decided)."""
        waiting = await self.pending_approvals(session_id)
        if not waiting:
            raise UsageError(f"session {session_id} has no tool call waiting for an approval")
        if call_id is None:
            if len(waiting) > 1:
                calls = ", ".join(f"{r.tool_use_id} ({r.name})" for r in waiting)
                raise UsageError(f"session {session_id} has {len(waiting)} calls waiting; name one of: {calls}")
            call_id = waiting[0].tool_use_id
        if call_id not in {r.tool_use_id for r in waiting}:
            raise UsageError(f"session {session_id}: no call {call_id!r} waits for an approval")
        event = ApprovalDecided(
            id=new_event_id("approval"), tool_use_id=call_id, approved=not deny, author=author, reason=reason
        )
        return (await self.log.append(session_id, event, channel="input")).seq, call_id

    async def pending_approvals(self, session_id: str) -> list[ApprovalRequested]:
        """The session's tool calls that wait for a decision, oldest first."""
        records = await self.log.read(session_id)
        decided = {r.event.tool_use_id for r in records if isinstance(r.event, ApprovalDecided)}
        requested = [r.event for r in records if isinstance(r.event, ApprovalRequested)]
        if _ended(records):
            return []
        return [r for r in requested if r.tool_use_id not in decided]

    async def dismiss(self, session_id: str, *, author: str, note: str = "") -> int:
        """Someone looked: the session leaves every inbox until it next needs a person."""
        state = await self.log.state(session_id)
        if not state.needs_person:
            raise UsageError(f"session {session_id} is {state.status}; it is not in the inbox")
        event = InboxDismissed(id=new_event_id("dismiss"), author=author, note=note)
        return (await self.log.append(session_id, event, channel="input")).seq

    async def delivered(self, session_id: str, seq: int) -> MessageDelivered:
        """Wait until the message at `seq` went into a model request (its receipt); if the session ends
        first, `SessionUnsuccessful` (nobody will read it)."""
        state = SessionState(session_id=session_id)
        async with contextlib.aclosing(self.log.tap(session_id, start="start", follow=True)) as records:
            async for rec in records:
                if isinstance(rec.event, MessageDelivered) and rec.event.message_seq == seq:
                    return rec.event
                state = fold(state, rec)
                if state.terminal and rec.seq > seq:
                    raise SessionUnsuccessful(session_id, state.status, f"it ended before message #{seq} was read")
        raise SessionUnsuccessful(session_id, state.status, "the connection closed")  # pragma: no cover


def _ended(records: list[Record]) -> bool:
    ends = [r.seq for r in records if isinstance(r.event, SessionEnded)]
    follow_ups = [r.seq for r in records if isinstance(r.event, HumanMessage) and r.event.mode == "queue"]
    return bool(ends) and (not follow_ups or max(ends) > max(follow_ups))
