"""What is checked before every model call: the budget and runaway control the budget cannot
see (no-progress detection), read from the log alone.

The budget limits themselves (`over_budget`, `remaining`, `Stop`) live in `agentbus.budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from agentbus.budget import Stop, merge, over_budget
from agentbus.messages import Budget, ModelResponded, Record, ResumeRequested, SessionCreated, ToolCallCompleted
from agentbus.state import SessionState

NO_PROGRESS_TURNS = 3


def no_progress(records: Sequence[Record], turns: int = NO_PROGRESS_TURNS) -> Stop | None:
    """The last `turns` model turns repeated one tool call, or produced nothing new.

    A turn makes progress when it calls a tool with arguments not tried before, gets a tool
    result not seen before, or says something it has not said before. A `resume` starts
    the count afresh, so a person who lets it continue gets `turns` more chances.
    """
    progress = Progress(turns)
    progress.fold(records)
    return progress.stop()


class Progress:
    """`no_progress` kept as a session's log grows, each record read once (a run asks before every
    model call, and a long session's turns were read again at every step). `fold` reads the
    records past those it has read; records that changed otherwise need a new `Progress`."""

    def __init__(self, turns: int = NO_PROGRESS_TURNS) -> None:
        self.turns = turns
        self.folded = 0  # records[:folded] are read
        self._afresh()

    def _afresh(self) -> None:
        self.calls: set[str] = set()
        self.results: set[str] = set()
        self.texts: set[str] = set()
        self.idle, self.idle_last = 0, ""  # the recent turns that made no progress: how many, the last
        self.same, self.same_last = 0, ""  # the run of turns making exactly the same calls

    def fold(self, records: Sequence[Record]) -> None:
        for i in range(self.folded, len(records)):
            self.add(records[i].event)
        self.folded = len(records)

    def add(self, ev: Any) -> None:
        # by exact type: no event class derives from another (tests/test_messages.py holds that)
        kind = type(ev)
        if kind is ModelResponded:
            self._turn(ev)
        elif kind is ToolCallCompleted:
            if ev.output not in self.results:
                self.results.add(ev.output)
                self.idle = 0
        elif kind is ResumeRequested:
            self._afresh()

    def _turn(self, ev: ModelResponded) -> None:
        calls, text = _turn(ev)
        new = [c for c in calls if c not in self.calls] or (text and text not in self.texts)
        self.calls.update(calls)
        if text:
            self.texts.add(text)
        if new:
            self.idle = 0
        else:
            self.idle, self.idle_last = self.idle + 1, calls[0] if calls else "an empty turn"
        signature = ";".join(calls)
        if calls and self.same and self.same_last == signature:
            self.same += 1
        else:
            self.same, self.same_last = (1, signature) if calls else (0, "")

    def stop(self) -> Stop | None:
        if self.turns <= 0:
            return None
        if self.same >= self.turns:
            return Stop("no_progress", f"the same tool call {self.turns} times in a row: {self.same_last[:200]}")
        if self.idle >= self.turns:
            return Stop("no_progress", f"{self.idle} turns in a row without anything new (last: {self.idle_last})")
        return None


class Guards:
    """The session's budget (the pool's defaults, then the session's own, then every `resume`
    raise, in log order: `agentbus.budget.effective_budget`) and its `Progress`, kept as the log
    grows. `fold` is given the records as they stand and the `epoch` they are of: records that
    changed other than by growing at the end (read again, an older one arriving late) have
    another epoch, and are read afresh."""

    def __init__(self, pool_budget: Budget, turns: int = NO_PROGRESS_TURNS) -> None:
        self.pool_budget, self.turns = pool_budget, turns
        self._epoch = -1  # no records read: the first `fold` starts afresh

    def _afresh(self) -> None:
        self._layers = [self.pool_budget]
        self._budget: Budget | None = self.pool_budget
        self._progress = Progress(self.turns)

    def fold(self, records: Sequence[Record], epoch: int) -> None:
        if epoch != self._epoch or len(records) < self._progress.folded:
            self._epoch = epoch
            self._afresh()
        progress = self._progress
        for i in range(progress.folded, len(records)):  # one pass for both
            ev: Any = records[i].event
            progress.add(ev)
            kind = type(ev)
            if kind is SessionCreated or kind is ResumeRequested:
                self._layers.append(ev.task.budget if kind is SessionCreated else ev.budget)
                self._budget = None
        progress.folded = len(records)

    def budget(self) -> Budget:
        if self._budget is None:
            self._budget = merge(*self._layers)
        return self._budget

    def stop(self, state: SessionState, now: float) -> Stop | None:
        """Budgets first, then no-progress."""
        return over_budget(self.budget(), state, now) or self._progress.stop()


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
