"""Runaway control the budget cannot see, checked before every model call: no-progress detection. Pure.

The budget limits themselves (`over_budget`, `remaining`, `Stop`) live in `agentbus.budget`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agentbus.budget import Stop
from agentbus.messages import ModelResponded, Record, ResumeRequested, ToolCallCompleted

NO_PROGRESS_TURNS = 3


def no_progress(
    records: Sequence[Record], turns: int = NO_PROGRESS_TURNS, seen: dict[int, tuple[list[str], str]] | None = None
) -> Stop | None:
    """The last `turns` model turns repeated one tool call, or produced nothing new.

    A turn makes progress when it calls a tool with arguments not tried before, gets a tool
    result not seen before, or says something it has not said before. A `resume` starts
    the count afresh, so a person who lets it continue gets `turns` more chances.

    `seen` keeps each turn's calls and text by stream sequence for a caller that asks at every
    step of one session: a long session then serializes each call's arguments once, not at
    every step.
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
            known = seen.get(rec.seq) if seen is not None else None
            calls, text = known if known is not None else _turn(ev)
            if seen is not None and known is None:
                seen[rec.seq] = (calls, text)
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


def _turn(ev: ModelResponded) -> tuple[list[str], str]:
    """A turn's tool calls (name and arguments) and its text."""
    # the arguments in one canonical spelling (keys sorted), so the same call reads the same
    calls = [f"{b.get('name')}({_canonical(b.get('input'))})" for b in ev.content if b.get("type") == "tool_use"]
    return calls, " ".join(str(b.get("text", "")) for b in ev.content if b.get("type") == "text").strip()


def _canonical(value: object) -> str:
    try:
        return msgspec.json.encode(value, order="sorted").decode()
    except (TypeError, msgspec.EncodeError):  # not JSON-shaped (a content block built in memory, say)
        return repr(value)
