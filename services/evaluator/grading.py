"""Grading in a separate context: checks run sandboxed on a copy of the workspace, criteria go to a grader model.

The grader sees the task, the criteria and the output; never the agent's reasoning,
tool calls or conversation. `grader_request` is the one place that decides what it sees.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentbus import repo
from agentbus.messages import (
    BranchCreated,
    ChangesCommitted,
    CheckResult,
    CommitFailed,
    CriterionResult,
    Record,
    Task,
    Usage,
    text_of,
)
from agentbus.models import ModelClient
from agentbus.sandbox import Limits, Policy, Sandbox
from agentbus.workspace import PathRefused, copy_tree, session_workspace

CHECK_TIMEOUT_S = 120.0
OUTPUT_CAP = 4000

GRADER_SYSTEM = (
    "You grade the output of another agent against criteria. You see only the task, the criteria and "
    "the output. Judge each criterion on its own. Answer with JSON only, no prose around it: "
    '{"criteria": [{"criterion": "<the criterion, verbatim>", "passed": true|false, '
    '"score": 0.0-1.0, "critique": "<what is wrong and how to fix it; empty if passed>"}]}'
)


class GradingError(Exception):
    """Grading itself could not run (grader unreachable, unreadable answer)."""


async def run_checks(
    checks: tuple[str, ...],
    root: Path,
    session_id: str,
    sandbox: Sandbox,
    *,
    committed: tuple[str, str] | None = None,
) -> tuple[CheckResult, ...]:
    """Each check in the sandbox, on its own fresh copy of the session's workspace; exit 0 passes.

    The workspace is `root/<session id>`: the evaluator's own configuration, never a path from an
    event (an agent could record any path there). A session on a repository (`committed`: the
    repository and the commit its log names) is checked on a checkout of that commit instead,
    not on the live worktree; the repository is used only if it has a worktree at that workspace.
    """
    if not checks:
        return ()
    try:
        source = session_workspace(root, session_id)
        origin = await asyncio.to_thread(repo.verified, committed[0], source) if committed else None
    except (PathRefused, repo.GitError) as err:
        return tuple(CheckResult(command=c, passed=False, output=f"not run: {err}") for c in checks)
    results = []
    for command in checks:
        with tempfile.TemporaryDirectory(prefix="agentbus-check-") as tmp:
            copy = Path(tmp) / "workspace"
            if origin is not None and committed is not None:
                await repo.checkout_commit(origin, committed[1], copy)
            else:
                await asyncio.to_thread(copy_tree, source, copy)
            results.append(await _run_check(command, copy, sandbox))
    return tuple(results)


def committed_head(records: list[Record]) -> tuple[str, str] | None:
    """The repository and the commit the session's branch was at when its last round ended, as its
    log says (None: a session on no repository)."""
    for rec in reversed(records):
        match rec.event:
            case ChangesCommitted(repo=where, commit=commit) | CommitFailed(repo=where, head=commit) if commit:
                return where, commit
            case BranchCreated(repo=where, base_commit=commit) if commit:
                return where, commit
    return None


async def _run_check(command: str, workspace: Path, sandbox: Sandbox) -> CheckResult:
    # Output past the cap is drained, not kept: a check that prints a lot still runs to its end.
    limits = Limits(timeout_s=CHECK_TIMEOUT_S, output_bytes=OUTPUT_CAP * 4)
    outcome = await sandbox.run(command, workspace, Policy(limits=limits, overflow="drain"))
    text = outcome.output.decode(errors="replace")
    if len(text) > OUTPUT_CAP or outcome.cut:
        text = text[:OUTPUT_CAP] + "\n... [more output cut]"
    if outcome.timed_out:
        return CheckResult(command=command, passed=False, output=f"timed out after {CHECK_TIMEOUT_S:g}s\n{text}")
    code = outcome.exit_code
    return CheckResult(command=command, passed=code == 0, exit_code=code, output=text + outcome.why())


def grader_request(task: Task, output: str) -> list[dict[str, Any]]:
    """The grader's whole conversation: task, criteria, output. Nothing else crosses over."""
    criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(task.criteria, 1))
    text = f"<task>\n{task.prompt}\n</task>\n\n<criteria>\n{criteria}\n</criteria>\n\n<output>\n{output}\n</output>"
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@dataclass(frozen=True)
class Graded:
    """The grader's judgement of every criterion, and what its call used (counted in the session's spend)."""

    criteria: tuple[CriterionResult, ...] = ()
    model: str = ""
    usage: Usage = field(default_factory=Usage)


async def grade_criteria(model: ModelClient, task: Task, output: str, *, session_id: str) -> Graded:
    if not task.criteria:
        return Graded()
    reply = await model.respond(
        session_id=session_id, system=GRADER_SYSTEM, messages=grader_request(task, output), tools=[], max_tokens=2048
    )
    return Graded(parse_grades(text_of(reply.content), task.criteria), reply.model, reply.usage)


def parse_grades(text: str, criteria: tuple[str, ...]) -> tuple[CriterionResult, ...]:
    """Read the grader's JSON; a criterion it skipped counts as failed, an unreadable answer is an error."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0) if match else text)
        items = data["criteria"]
    except (ValueError, KeyError, TypeError) as err:
        raise GradingError(f"the grader's answer is not the JSON asked for: {text[:200]!r}") from err
    by_name = {str(i.get("criterion", "")).strip(): i for i in items if isinstance(i, dict)}
    results = []
    for pos, criterion in enumerate(criteria):
        item = by_name.get(criterion.strip()) or (
            items[pos] if pos < len(items) and isinstance(items[pos], dict) else None
        )
        if item is None:
            results.append(CriterionResult(criterion=criterion, passed=False, critique="the grader did not judge it"))
            continue
        score = item.get("score")
        results.append(
            CriterionResult(
                criterion=criterion,
                passed=bool(item.get("passed")),
                score=float(score) if isinstance(score, int | float) else None,
                critique=str(item.get("critique", "")),
            )
        )
    return tuple(results)
