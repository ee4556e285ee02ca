"""Runaway control, checked before every model call: budgets and no-progress detection. Pure functions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from agentbus.messages import Budget, ModelResponded, Record, ResumeRequested, SessionCreated, ToolCallCompleted
from agentbus.state import SessionState

NO_PROGRESS_TURNS = 3


@dataclass(frozen=True)
class Stop:
    limit: str  # max_steps, max_tool_calls, max_tokens, max_usd, max_wall, no_progress
    detail: str


def merge(*budgets: Budget) -> Budget:
    """Later budgets override earlier ones field by field (None leaves the earlier limit)."""
    out: dict[str, object] = {}
    for b in budgets:
        out.update({k: v for k, v in msgspec.structs.asdict(b).items() if v is not None})
    return Budget(**out)  # type: ignore[arg-type]


def effective_budget(pool_default: Budget, records: Sequence[Record]) -> Budget:
    """Pool defaults, then the session's own budget, then every `resume` raise, in log order."""
    layers = [pool_default]
    for rec in records:
        if isinstance(rec.event, SessionCreated):
            layers.append(rec.event.task.budget)
        elif isinstance(rec.event, ResumeRequested):
            layers.append(rec.event.budget)
    return merge(*layers)


def over_budget(budget: Budget, state: SessionState, now: float) -> Stop | None:
    """The first limit the session has reached, with the figures."""
    tokens = state.usage.total
    wall = now - state.created_ts if state.created_ts else 0.0
    checks: list[tuple[str, float | None, float, str]] = [
        ("max_steps", budget.max_steps, state.steps, "model calls"),
        ("max_tool_calls", budget.max_tool_calls, state.tool_calls, "tool calls"),
        ("max_tokens", budget.max_tokens, tokens, "tokens (input + cache write + cache read + output)"),
        ("max_usd", budget.max_usd, state.cost_usd, "USD"),
        ("max_wall", budget.max_wall_s, wall, "seconds"),
    ]
    for name, limit, used, unit in checks:
        if limit is not None and used >= limit:
            return Stop(name, f"{_fmt(used)} of {_fmt(limit)} {unit}")
    return None


def remaining(budget: Budget, state: SessionState, now: float) -> Budget:
    """What is left of a budget: a child session inherits this, not the whole."""

    def left(limit: float | None, used: float) -> float | None:
        return None if limit is None else max(limit - used, 0)

    wall = now - state.created_ts if state.created_ts else 0.0
    steps, calls, tokens = (left(budget.max_steps, state.steps), left(budget.max_tool_calls, state.tool_calls),
                            left(budget.max_tokens, state.usage.total))  # fmt: skip
    return Budget(
        max_steps=int(steps) if steps is not None else None,
        max_tool_calls=int(calls) if calls is not None else None,
        max_tokens=int(tokens) if tokens is not None else None,
        max_usd=left(budget.max_usd, state.cost_usd),
        max_wall_s=left(budget.max_wall_s, wall),
    )


def no_progress(records: Sequence[Record], turns: int = NO_PROGRESS_TURNS) -> Stop | None:
    """The last `turns` model turns repeated one tool call, or produced nothing new.

    A turn makes progress when it calls a tool with arguments not tried before, gets a tool
    result not seen before, or says something it has not said before. A `resume` starts
    the count afresh, so a person who lets it continue gets `turns` more chances.
    """
    if turns <= 0:
        return None
    start = max((i for i, r in enumerate(records) if isinstance(r.event, ResumeRequested)), default=-1) + 1
    seen_calls: set[str] = set()
    seen_results: set[str] = set()
    seen_texts: set[str] = set()
    idle: list[str] = []  # descriptions of the recent turns that made no progress
    same: list[str] = []  # the run of turns making exactly the same calls
    for rec in records[start:]:
        ev = rec.event
        if isinstance(ev, ModelResponded):
            calls = [f"{b.get('name')}({json.dumps(b.get('input'), sort_keys=True)})" for b in ev.content
                     if b.get("type") == "tool_use"]  # fmt: skip
            text = " ".join(str(b.get("text", "")) for b in ev.content if b.get("type") == "text").strip()
            new = [c for c in calls if c not in seen_calls] or (text and text not in seen_texts)
            seen_calls.update(calls)
            if text:
                seen_texts.add(text)
            idle = [] if new else [*idle, calls[0] if calls else "an empty turn"]
            signature = ";".join(calls)
            same = [*same, signature] if calls and same and same[-1] == signature else ([signature] if calls else [])
        elif isinstance(ev, ToolCallCompleted) and ev.output not in seen_results:
            seen_results.add(ev.output)
            idle = []
    if len(same) >= turns:
        return Stop("no_progress", f"the same tool call {turns} times in a row: {same[-1][:200]}")
    if len(idle) >= turns:
        return Stop("no_progress", f"{len(idle)} turns in a row without anything new (last: {idle[-1]})")
    return None


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
