"""What happens after a verdict: a pure function of the task and the verdicts so far (replayable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agentbus.messages import CheckResult, CriterionResult, Task, VerdictRecorded

PIVOT_AFTER = 2  # consecutive failed rounds on one criterion or check before starting afresh


@dataclass(frozen=True)
class Next:
    action: Literal["complete", "revise", "fail"]
    reason: str = ""
    critique: str = ""
    fresh_start: bool = False


def verdict_of(criteria: tuple[CriterionResult, ...], checks: tuple[CheckResult, ...]) -> str:
    ok = all(c.passed for c in criteria) and all(c.passed for c in checks)
    return "satisfied" if ok else "needs_revision"


def critique_of(criteria: tuple[CriterionResult, ...], checks: tuple[CheckResult, ...]) -> str:
    """Names every failed criterion and check; a check comes with its command and output."""
    parts = []
    for c in checks:
        if not c.passed:
            code = f"exit code {c.exit_code}" if c.exit_code is not None else "did not finish"
            output = c.output.rstrip()
            # a check that printed nothing says so on its own line, not after a dangling "Output:"
            parts.append(
                f"- check `{c.command}` failed ({code}). " + (f"Output:\n{output}" if output else "It printed nothing.")
            )
    for cr in criteria:
        if not cr.passed:
            parts.append(f"- criterion not met: {cr.criterion}. {cr.critique}".rstrip())
    return "The evaluator sent your result back. Fix these and answer again:\n" + "\n".join(parts)


def failing_keys(v: VerdictRecorded) -> set[str]:
    return {f"criterion:{c.criterion}" for c in v.criteria if not c.passed} | {
        f"check:{c.command}" for c in v.checks if not c.passed
    }


def decide(
    task: Task, verdicts: list[VerdictRecorded], *, pivot_after: int = PIVOT_AFTER, first_round: int = 1
) -> Next:
    """After the latest verdict in `verdicts` (oldest first): complete, revise (maybe afresh) or fail.

    `first_round` is the first round of the current turn (a follow-up on a completed session
    opens a new turn, whose rounds count against `max_rounds` afresh).
    """
    latest = verdicts[-1]
    if latest.verdict == "satisfied":
        return Next("complete")
    if latest.verdict == "failed":
        return Next("fail", reason=f"evaluation could not run: {latest.critique}")
    if latest.round - first_round + 1 >= task.max_rounds:
        return Next("fail", reason="max_rounds")
    fresh = False
    if pivot_after > 0 and len(verdicts) >= pivot_after:
        recent = [failing_keys(v) for v in verdicts[-pivot_after:]]
        fresh = bool(set.intersection(*recent))
        # Only once per streak: right after a pivot the old conversation is already gone.
        if (
            fresh
            and len(verdicts) > pivot_after
            and set.intersection(*recent, failing_keys(verdicts[-pivot_after - 1]))
        ):
            fresh = False
    critique = latest.critique
    if fresh:
        history = "\n\n".join(f"Round {v.round}:\n{v.critique}" for v in verdicts)
        critique = (
            "Earlier attempts at this task were rejected more than once for the same reasons, so you are "
            "starting over with a clean slate. What the evaluator said so far:\n\n" + history
        )
    return Next("revise", critique=critique, fresh_start=fresh)
