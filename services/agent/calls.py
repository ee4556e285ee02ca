"""The tool calls of one model turn: approvals, honest re-runs, interrupts, and the tools that wait.

A call runs at most once. A call the log shows as started with no result was cut off by a
crash: only a tool that declares itself safe to repeat (`repeatable`) runs again; for any
other the model hears that it was interrupted and may have partly run. Tools that wait
(`ask_human`, `delegate`) and calls that need an approval park the session instead of
holding the agent's slot; the answer queues it again and the call picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Literal

from agentbus import tracing
from agentbus.budget import remaining
from agentbus.messages import (
    TERMINAL,
    ApprovalDecided,
    ApprovalRequested,
    DelegationCompleted,
    DelegationRequested,
    HumanMessage,
    QuestionAsked,
    ResumeRequested,
    SessionPaused,
    Task,
    Timer,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
)
from agentbus.subjects import valid_token
from services.agent import repo_workspace
from services.agent.conversation import Conversation, ToolUse, human_text
from services.agent.signals import Interrupted, Parked, Released
from services.agent.tools import Tool, ToolContext, ToolError

if TYPE_CHECKING:
    from services.agent.run import SessionRun

INTERRUPTED_BY_CRASH = (
    "interrupted: the agent running this call stopped (a crash) before it recorded a result, so the call "
    "may have partly run. Check its effects before you try it again."
)


def child_id(sid: str, tool_use_id: str) -> str:
    """The child session a `delegate` call starts: one per call, however often it is re-run."""
    return f"{sid[:40]}-{hashlib.sha256(tool_use_id.encode()).hexdigest()[:10]}"


class _CutOff:
    """Stands in for a tool whose call was cut off by max_tokens: its input cannot be trusted."""

    name = "cut_off"
    description = ""
    input_schema: dict[str, Any] = {}
    repeatable = True

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        raise ToolError("not run: your reply hit the output token limit before this call was complete; send it again")


class ToolCalls:
    """Runs the pending tool calls of one session run."""

    def __init__(self, run: SessionRun) -> None:
        self.run = run
        self.ctx = run.ctx

    async def run_call(self, use: ToolUse, conv: Conversation) -> Literal["done", "paused"]:
        """Run one call to its recorded result, or park (raises `Parked`), or pause the session."""
        tool: Tool | None = _CutOff() if use.truncated else self.ctx.tools.get(use.name)
        if use.started and not use.parked and not getattr(tool, "repeatable", False):
            await self._complete(use, INTERRUPTED_BY_CRASH, is_error=True)
            return "done"
        if self._needs_approval(use, conv) and (use.decision is None or not use.decision.approved):
            decided = use.decision or await self._await_approval(use)
            if decided is None:
                return "paused"
            if not decided.approved:
                why = f"denied by {decided.author}" + (f": {decided.reason}" if decided.reason else "")
                await self._complete(use, f"not run: {why}", is_error=True)
                return "done"
        if not (use.started and use.parked):  # a parked call picks up where it stopped: no second start
            suffix = f"-rerun{self.run.job.attempt}" if use.started else ""
            await self.run.append(
                ToolCallStarted(
                    id=f"step-{use.step}-start-{use.id}{suffix}",
                    step=use.step,
                    tool_use_id=use.id,
                    name=use.name,
                    input=use.input,
                    rerun=use.started,
                )
            )
        output, is_error = await self._call(tool, use, conv)
        await self._complete(use, output, is_error=is_error)
        return "done"

    async def close_waiting(self, conv: Conversation, why: str) -> None:
        """Give every call that started or parked a result, so the log never leaves one open."""
        for use in conv.pending_tools:
            if use.started or use.parked:
                await self._complete(use, why, is_error=True)

    async def _call(self, tool: Tool | None, use: ToolUse, conv: Conversation) -> tuple[str, bool]:
        """The tool's output, or its error as text for the model (a tool never crashes the loop)."""
        ctx = ToolContext(
            session_id=self.run.sid,
            workspace=self.run.workspace(),
            step=use.step,
            tool_use_id=use.id,
            delegate=lambda prompt, pool: self._delegate(use, conv, prompt, pool),
            ask_human=lambda question: self._ask_human(use, question),
            sandbox=self.ctx.sandbox,
            network=self.ctx.network,
            tool_env=self.ctx.tool_env,
            read_child_diff=lambda child, stat, offset: repo_workspace.read_child_diff(self.run, child, stat, offset),
        )
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": use.name, "gen_ai.tool.call.id": use.id}
        with tracing.span(
            f"execute_tool {use.name}", session_id=self.run.sid, pool=self.ctx.pool, attributes=attrs
        ) as span:
            try:
                if tool is None:
                    raise ToolError(f"unknown tool {use.name!r}; this agent offers {', '.join(self.ctx.tools)}")
                return str(await self.run.activity(tool.run(use.input, ctx))), False
            except (Released, Parked):
                raise
            except Interrupted:
                who = self.run.interrupted_by or "a person"
                return f"interrupted by {who} before it finished; it may have partly run", True
            except Exception as err:
                span.set_attribute("error.type", type(err).__name__)
                tracing.tool_errors.add(1, {"gen_ai.tool.name": use.name, tracing.POOL: self.ctx.pool})
                return (str(err) or type(err).__name__), True

    async def _complete(self, use: ToolUse, output: str, *, is_error: bool) -> None:
        await self.run.append(
            ToolCallCompleted(
                id=f"step-{use.step}-result-{use.id}",
                step=use.step,
                tool_use_id=use.id,
                name=use.name,
                output=output,
                is_error=is_error,
            )
        )

    async def _park(
        self, use: ToolUse, waiting_for: Literal["answer", "approval", "subtask"], detail: str = ""
    ) -> None:
        await self.run.append(
            ToolCallParked(
                id=f"parked-{use.id}-{self.run.claim}",
                step=use.step,
                tool_use_id=use.id,
                name=use.name,
                waiting_for=waiting_for,
                detail=detail,
            )
        )

    # --- approvals ----------------------------------------------------------------------------------

    def _needs_approval(self, use: ToolUse, conv: Conversation) -> bool:
        task_list = conv.task.approve if conv.task is not None else ()
        return use.name in self.ctx.approve or use.name in task_list

    async def _await_approval(self, use: ToolUse) -> ApprovalDecided | None:
        """The decision, once there is one; parks until then (None: the session paused on a timeout)."""
        if self.run.item.reason == "timeout" and self._expired(use):
            return await self._timed_out(use)
        if not use.approval_requested:
            await self.run.append(
                ApprovalRequested(
                    id=f"approval-{use.id}",
                    step=use.step,
                    tool_use_id=use.id,
                    name=use.name,
                    input=use.input,
                    timeout_s=self.ctx.approval_timeout_s,
                    on_timeout=self.ctx.on_approval_timeout,
                )
            )
        await self._park(use, "approval")
        if self.ctx.approval_timeout_s:
            due = time.time() + self.ctx.approval_timeout_s
            timer = Timer(session_id=self.run.sid, due_ts=due, tool_use_id=use.id, round=self.run.item.round)
            await self.ctx.queues.schedule(timer, cause=f"{use.id}-{self.run.claim}")
        await self.run.refresh()  # a decision made while we were recording the request counts
        decided = self._decision(use.id)
        if decided is None:
            raise Parked(f"{use.name} waits for an approval")
        return decided

    def _decision(self, tool_use_id: str) -> ApprovalDecided | None:
        found = [r.event for r in self.run.records if isinstance(r.event, ApprovalDecided)]
        return next((d for d in found if d.tool_use_id == tool_use_id), None)

    def _expired(self, use: ToolUse) -> bool:
        """The wait for this approval, from its first park since the session last paused or was
        resumed, lasted longer than the pool allows.

        From the first park, not the latest: a message while it waits wakes the session, which
        parks again with a timer of its own, and the first timer, finding a newer park, would
        otherwise park once more and set another; the two timers then kept finding each other's
        parks. A resume starts a new wait, with the whole timeout again."""
        timeout = self.ctx.approval_timeout_s
        first: ToolCallParked | None = None
        for rec in self.run.records:
            ev = rec.event
            if isinstance(ev, SessionPaused | ResumeRequested):
                first = None
            elif first is None and isinstance(ev, ToolCallParked) and ev.tool_use_id == use.id:
                first = ev if ev.waiting_for == "approval" else None
        return bool(timeout and first is not None and time.time() >= first.ts + timeout)

    async def _timed_out(self, use: ToolUse) -> ApprovalDecided | None:
        timeout = self.ctx.approval_timeout_s or 0
        if self.ctx.on_approval_timeout == "pause":
            # keyed by the claim: after a resume the same call may time out again, and a second
            # pause under the first one's id would be dropped as its duplicate
            why = f"{use.name} waited {timeout:g}s for an approval"
            await self.run.pause("approval_timeout", why, f"{use.id}-{self.run.claim}")
            return None
        decided = ApprovalDecided(
            id=f"approval-timeout-{use.id}-{self.run.claim}",
            tool_use_id=use.id,
            approved=False,
            author="timeout",
            reason=f"nobody decided within {timeout:g}s",
        )
        await self.run.append(decided)
        return decided

    # --- tools that wait ----------------------------------------------------------------------------

    async def _ask_human(self, use: ToolUse, question: str) -> str:
        """The answer to the model's question; parks the session until a person gives one."""
        asked = self._asked(use.id)
        if asked is None:
            asked = (
                await self.run.append(QuestionAsked(id=f"question-{use.id}", text=question, tool_use_id=use.id))
            ).seq
        if answer := self._answer_after(asked):
            return human_text(answer)
        await self._park(use, "answer")
        await self.run.refresh()
        if answer := self._answer_after(asked):
            return human_text(answer)
        raise Parked("waiting for an answer")

    def _asked(self, tool_use_id: str) -> int | None:
        return next(
            (
                r.seq
                for r in self.run.records
                if isinstance(r.event, QuestionAsked) and r.event.tool_use_id == tool_use_id
            ),
            None,
        )

    def _answer_after(self, seq: int) -> HumanMessage | None:
        """The first message after the question (a follow-up queued for later is not an answer)."""
        for rec in self.run.records:
            if rec.seq > seq and isinstance(rec.event, HumanMessage) and rec.event.mode == "steer":
                return rec.event
        return None

    async def _delegate(self, use: ToolUse, conv: Conversation, prompt: str, pool: str | None) -> str:
        """The child session's result; parks the parent until the child ends (or pauses)."""
        task = conv.task
        assert task is not None
        child = child_id(self.run.sid, use.id)
        if not any(
            isinstance(r.event, DelegationRequested) and r.event.child_session == child for r in self.run.records
        ):
            await self._start_child(use, task, child, prompt, pool or self.ctx.pool)
        state = await self.ctx.log.state(child)
        if not _settled(state.status):
            await self._park(use, "subtask", child)
            state = await self.ctx.log.state(child)  # it may have ended while we recorded the wait
            if not _settled(state.status):
                raise Parked(f"waiting for subtask {child}")
        await self.run.append(
            DelegationCompleted(
                id=f"delegated-{use.id}", child_session=child, status=state.status, result=state.result,
                tool_use_id=use.id,
            )
        )  # fmt: skip
        if state.status == "paused":
            raise ToolError(f"subtask {child} is paused ({state.reason}); resume it or carry on without it")
        if state.status != "completed":
            raise ToolError(f"subtask {child} ended {state.status}: {state.reason}")
        return state.result + await repo_workspace.child_changes(self.ctx.log, child)  # issue 19: its branch

    async def _start_child(self, use: ToolUse, task: Task, child: str, prompt: str, target: str) -> None:
        """Record the delegation and open the child session (once per tool call, however late a re-run)."""
        depth = task.depth + 1
        if depth > self.ctx.max_depth:
            raise ToolError(f"delegation refused: depth limit {self.ctx.max_depth} reached")
        if not valid_token(target):
            raise ToolError(f"delegation refused: pool name {target!r} must be letters, digits, '-' or '_'")
        if not prompt.strip():
            raise ToolError("delegation refused: the subtask's prompt is empty")
        asked = {r.event.child_session for r in self.run.records if isinstance(r.event, DelegationRequested)}
        if len(asked) >= self.ctx.max_children:
            raise ToolError(f"delegation refused: this session already started {len(asked)} subtasks (the limit)")
        await self.run.append(
            DelegationRequested(
                id=f"delegate-{use.id}", child_session=child, pool=target, prompt=prompt, tool_use_id=use.id
            )
        )
        budget = remaining(self.run.budget(), self.run.state(), time.time())
        child_task = Task(
            session_id=child,
            prompt=prompt,
            pool=target,
            parent_session=self.run.sid,
            depth=depth,
            submitter=f"agent:{self.run.sid}",
            budget=budget,
        )
        await self.ctx.queues.open_session(child_task, trace_id=tracing.current_trace_id())


def _settled(status: str) -> bool:
    return status in TERMINAL or status == "paused"
