"""What the browser receives: sessions, records, budgets and permissions as plain JSON-ready dicts (pure).

Everything here is data that others wrote (models, tools, people); it is sent as JSON and the page
puts it in the document with `textContent` only, so no string here is ever markup. Long strings
are clipped for the live view (`clipped: true`); the page fetches the whole record on "show all".
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from agentbus import budget as budgets
from agentbus.inbox import item_of
from agentbus.messages import Budget, ModelResponded, Record, ResumeRequested, SessionCreated, to_builtins
from agentbus.roles import Identity, permissions
from agentbus.state import SessionState
from agentbus.subjects import Namespace

CLIP = 4000  # characters of one string shown before "show all"
_PROMPT = 200


def clip(value: Any, limit: int = CLIP) -> tuple[Any, bool]:
    """`value` (JSON builtins) with every string longer than `limit` cut to it; and whether any was."""
    if isinstance(value, str):
        return (value[:limit], True) if len(value) > limit else (value, False)
    if isinstance(value, list):
        out, cut = [], False
        for item in value:
            v, c = clip(item, limit)
            out.append(v)
            cut |= c
        return out, cut
    if isinstance(value, dict):
        d, cut = {}, False
        for key, item in value.items():
            v, c = clip(item, limit)
            d[key] = v
            cut |= c
        return d, cut
    return value, False


def record_view(record: Record, *, full: bool = False) -> dict[str, Any]:
    """One log record for the page: where it sits, who wrote it, and the event (clipped unless `full`)."""
    event = to_builtins(record.event)
    cut = False
    if not full:
        event, cut = clip(event)
    view: dict[str, Any] = {"seq": record.seq, "channel": record.channel, "event": event}
    if record.sender:
        view["sender"] = record.sender
    if cut:
        view["clipped"] = True
    return view


def capabilities(ident: Identity, ns: Namespace, session_id: str, pool: str | None) -> dict[str, bool]:
    """Which controls this user's NATS permissions would let through on one session: the page shows
    only these. They are a courtesy; the server acts as the user, so NATS refuses the rest anyway."""
    if ident.role is None:  # a plain NATS user: agentbus cannot know its permissions, the server decides
        return {"steer": True, "resume": True}
    perms = permissions(ident)
    steer = perms.may_publish(ns.session_input(session_id, ident.user))
    resume = perms.may_publish(ns.session_control(session_id, ident.user)) and perms.may_publish(
        ns.work(pool or "default")
    )
    return {"steer": steer, "resume": resume}


def state_view(state: SessionState, ident: Identity, ns: Namespace) -> dict[str, Any]:
    """A session's folded state, with what the inbox says of it and what this user may do to it."""
    item = item_of(state)
    result, _ = clip(state.result, 2000)
    return {
        "id": state.session_id,
        "status": state.status,
        "pool": state.pool,
        "prompt": state.prompt[:_PROMPT],
        "submitter": state.submitter,
        "parent": state.parent_session,
        "depth": state.depth,
        "created_ts": state.created_ts,
        "updated_ts": state.updated_ts,
        "last_seq": state.last_seq,
        "events": state.events,
        "steps": state.steps,
        "tool_calls": state.tool_calls,
        "tokens": state.usage.total,
        "usage": msgspec.to_builtins(state.usage),
        "cost_usd": state.cost_usd,
        "round": state.round,
        "turn": state.turn,
        "result": result,
        "reason": state.reason,
        "children": list(state.children),
        "terminal": state.terminal,
        "waiting_for": state.waiting_for,
        "question": state.question,
        "tool_use_id": state.tool_use_id,
        "needs_person": state.needs_person,
        "why": item.why if state.needs_person else "",
        "since_ts": item.since_ts if state.needs_person else 0.0,
        "can": capabilities(ident, ns, state.session_id, state.pool),
    }


class SessionSummary:
    """What the session page shows beside the conversation, folded along a replay: the budget's
    limits (the task's, raised by each resume) and one chart point per model call."""

    def __init__(self) -> None:
        self.limits = Budget()
        self.points: list[dict[str, float]] = []
        self._cost = 0.0
        self._last_ts = 0.0

    def add(self, record: Record) -> dict[str, float] | None:
        """Take one record; returns the chart point it adds, if it is a model call."""
        ev = record.event
        if isinstance(ev, SessionCreated):
            self.limits = budgets.merge(self.limits, ev.task.budget)
            self._last_ts = ev.ts
        elif isinstance(ev, ResumeRequested):
            self.limits = budgets.merge(self.limits, ev.budget)
        elif isinstance(ev, ModelResponded):
            self._cost += ev.cost_usd
            took = max(ev.ts - self._last_ts, 0.0) if self._last_ts else 0.0
            self._last_ts = ev.ts
            point = {"seq": record.seq, "step": ev.step, "ts": ev.ts, "cost": ev.cost_usd,
                     "total": self._cost, "tokens": ev.usage.total, "took": took}  # fmt: skip
            self.points.append(point)
            return point
        return None

    def gauges(self, state: SessionState, now: float | None = None) -> list[dict[str, Any]]:
        """One gauge per budget limit: used, limit (None: no limit the session knows of) and unit."""
        now = time.time() if now is None else now
        used = {
            "max_steps": state.steps,
            "max_tool_calls": state.tool_calls,
            "max_tokens": state.usage.total,
            "max_usd": state.cost_usd,
            "max_wall_s": (state.updated_ts if state.terminal else now) - state.created_ts if state.created_ts else 0.0,
        }
        return [
            {
                "name": limit.name,
                "used": used[limit.field],
                "limit": getattr(self.limits, limit.field),
                "unit": limit.unit,
            }
            for limit in budgets.LIMITS
        ]
