"""The attention inbox: only the sessions that need a person, each with why, for how long, and what to do.

A session is in the inbox while it waits for an answer or an approval, is paused, or failed,
and nobody has dismissed it since it got there. A completed session appears only when its pool
wants its branch reviewed (`review = true`) and it is not merged yet: "ready for review". Every watcher
folds the same log, so every inbox agrees; `dismiss` is an event too.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import AsyncIterator

import msgspec

from agentbus.session import SessionLog
from agentbus.state import SessionState, fold


class InboxItem(msgspec.Struct, frozen=True, kw_only=True):
    """One session that needs a person (or, while following, one that no longer does: `present` False)."""

    session_id: str
    status: str
    why: str
    since_ts: float
    cost_usd: float
    pool: str | None = None
    question: str = ""  # the question asked, or the tool call to approve
    command: str = ""  # the one command that acts on it
    prompt: str = ""
    present: bool = True

    @property
    def waiting_s(self) -> float:
        return max(time.time() - self.since_ts, 0.0) if self.since_ts else 0.0


def item_of(state: SessionState) -> InboxItem:
    """The inbox's view of a session (present only if it needs a person)."""
    sid = state.session_id
    return InboxItem(
        session_id=sid,
        status=state.status,
        why=_why(state),
        since_ts=state.attention_since or state.updated_ts,
        cost_usd=state.cost_usd,
        pool=state.pool,
        question=state.question,
        command=_command(state),
        prompt=state.prompt,
        present=state.needs_person,
    )


def _why(state: SessionState) -> str:
    if state.status == "awaiting_approval":
        return f"approve or deny: {state.question}" if state.question else "a tool call waits for an approval"
    if state.status == "waiting":
        return f"asks: {state.question}" if state.question else "waits for an answer"
    if state.status == "paused":
        return f"paused: {state.reason}" if state.reason else "paused"
    if state.status == "completed":
        changes = f"{state.files_changed} files, +{state.insertions} -{state.deletions}"
        return f"ready for review: {state.branch} at {state.commit[:12]} ({changes})"
    return f"failed: {state.reason}" if state.reason else "failed"


def _command(state: SessionState) -> str:
    sid = shlex.quote(state.session_id)
    if state.status == "awaiting_approval":
        call = f" {shlex.quote(state.tool_use_id)}" if state.tool_use_id else ""
        return f"agentbus approve {sid}{call}   (or --deny --reason TEXT)"
    if state.status == "waiting":
        return f'agentbus say {sid} "your answer"'
    if state.status == "paused":
        limit = state.reason.split(":", 1)[0]
        flag = {"max_steps": "--max-steps N", "max_usd": "--max-usd X", "max_tokens": "--max-tokens N",
                "max_tool_calls": "--max-tool-calls N", "max_wall": "--max-wall S"}.get(limit, "")  # fmt: skip
        if limit == "interrupted":
            return f'agentbus say {sid} "what next"   (or agentbus resume {sid})'
        return f"agentbus resume {sid}" + (f" {flag}" if flag else "")
    if state.status == "completed":
        return f"agentbus diff {sid}; agentbus merge {sid}   (or agentbus inbox --dismiss {sid})"
    return f"agentbus show {sid}   (then agentbus inbox --dismiss {sid})"


class Inbox:
    """The inbox over one session log."""

    def __init__(self, log: SessionLog) -> None:
        self.log = log

    async def items(self) -> list[InboxItem]:
        """Every session that needs a person now, the longest-waiting first."""
        found = [item_of(state) for state in await self.log.states() if state.needs_person]
        return sorted(found, key=lambda i: (i.since_ts, i.session_id))

    async def follow(self) -> AsyncIterator[InboxItem]:
        """The current items, then each change as it happens: a session entering the inbox, leaving
        it (`present=False`), or still in it for another reason. One ordered consumer over every
        session, from where the listing stood: nothing between the two is missed."""
        start = await self.log.bus.stream_last_seq(self.log.ns.sessions_stream) + 1
        shown: dict[str, InboxItem] = {}
        for item in await self.items():
            shown[item.session_id] = item
            yield item
        states: dict[str, SessionState] = {}
        async for rec in self.log.tap(None, start=start, follow=True):
            sid = rec.session_id
            if not sid:
                continue
            state = states.get(sid)
            if state is None:
                state = await self.log.state(sid)  # up to now: this record and maybe later ones
            elif rec.seq > state.last_seq:
                state = fold(state, rec)
            states[sid] = state
            item = item_of(state)
            last = shown.get(sid)
            if item.present and (last is None or _key(last) != _key(item)):
                shown[sid] = item
                yield item
            elif not item.present and last is not None:
                del shown[sid]
                yield item


def _key(item: InboxItem) -> tuple[str, str, str]:
    return (item.status, item.why, item.question)
