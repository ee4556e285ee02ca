"""One session's run, from wherever its log stands to an end, a pause, or a hand-back.

Rules that make a crash harmless:
- every model response and tool result is in the log before the loop acts on it;
- the next request is rebuilt from the log, so a resumed agent sends what the dead one would have;
- the task's queue message is acked only after the session ended (or was handed on).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.bus import Job, PubAck
from agentbus.errors import AgentBusError, FencedError
from agentbus.messages import (
    TERMINAL,
    Budget,
    BudgetExceeded,
    CancelRequested,
    DelegationCompleted,
    DelegationRequested,
    Event,
    HumanMessage,
    ModelCallFailed,
    ModelResponded,
    QuestionAsked,
    Record,
    ResumeRequested,
    Routed,
    SessionClaimed,
    SessionEnded,
    StatusChanged,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
    WorkItem,
)
from agentbus.models import ModelClient, ModelError, cost_usd
from agentbus.queues import WorkQueues
from agentbus.service import backoff
from agentbus.session import SessionLog, SessionWriter
from agentbus.spend import SpendLedger
from agentbus.state import SessionState, fold
from agentbus.subjects import valid_token
from services.agent.conversation import Conversation, ToolUse, build, human_text
from services.agent.guards import Stop, effective_budget, no_progress, over_budget, remaining
from services.agent.telemetry import record_usage, request_model
from services.agent.tools import Tool, ToolContext, ToolError

logger = logging.getLogger("agentbus.agent")

Outcome = Literal["ended", "released"]
# Stop reasons after which another call makes sense (end_turn: a human spoke since; the others by design).
_CONTINUABLE = frozenset({"end_turn", "tool_use", "max_tokens", "pause_turn"})


class Released(Exception):
    """The worker is draining: stop here, leave the task for another agent."""


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a session run may use of its worker, and nothing more."""

    worker_id: str
    pool: str
    log: SessionLog
    queues: WorkQueues
    ledger: SpendLedger
    tools: Mapping[str, Tool]
    tool_schemas: list[dict[str, Any]]
    model_for: Callable[[str | None], ModelClient]
    draining: asyncio.Event
    system: str
    max_output_tokens: int
    runaway_steps: int
    max_depth: int
    max_children: int
    max_deliver: int
    pool_budget: Budget
    no_progress_turns: int
    workdir: Path


class _CutOff:
    """Stands in for a tool whose call was cut off by max_tokens: its input cannot be trusted."""

    name = "cut_off"
    description = ""
    input_schema: dict[str, Any] = {}

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        raise ToolError("not run: your reply hit the output token limit before this call was complete; send it again")


def child_id(sid: str, tool_use_id: str) -> str:
    """The child session a `delegate` call starts: one per call, however often it is re-run."""
    return f"{sid[:40]}-{hashlib.sha256(tool_use_id.encode()).hexdigest()[:10]}"


class SessionRun:
    """Runs one session from wherever its log stands to an end, or to a drain."""

    def __init__(self, ctx: RunContext, session_id: str, job: Job) -> None:
        self.ctx = ctx
        self.sid = session_id
        self.job = job
        self.log = ctx.log
        self.records: list[Record] = []
        self.writer: SessionWriter | None = None

    async def execute(self) -> Outcome:
        await self._refresh()
        conv = build(self.records)
        if conv.task is None:
            raise AgentBusError(f"session {self.sid} has no session_created event")
        if conv.ended:
            return "ended"
        last_log = max((r.seq for r in self.records if r.channel == "log"), default=0)
        self.writer = SessionWriter(self.log, self.sid, last_log)
        claim = SessionClaimed(
            id=f"claim-{self.job.seq}-{self.job.attempt}",
            worker=self.ctx.worker_id,
            attempt=self.job.attempt,
            round=conv.round,
            workspace=str(self._workspace().resolve()),
        )
        await self._append(claim)
        if self.job.attempt == 1 and conv.steps == 0:
            logger.info("session %s started on pool %s", self.sid, self.ctx.pool)
        else:
            logger.info("session %s resumed at step %d (attempt %d)", self.sid, conv.steps, self.job.attempt)
        return await self._loop()

    async def _loop(self) -> Outcome:
        while True:
            if self.ctx.draining.is_set():
                return "released"
            conv = build(self.records)
            if conv.ended:
                return "ended"  # ended elsewhere (evaluator, a give-up record): nothing left to do
            outcome = await self._next(conv)
            if outcome is not None:
                return outcome
            await self._refresh()

    async def _next(self, conv: Conversation) -> Outcome | None:
        """Do the one thing the log says comes next; an outcome when the run is over."""
        if conv.cancel:
            why = f"cancelled by {conv.cancel.author}" + (f": {conv.cancel.reason}" if conv.cancel.reason else "")
            return await self._end("cancelled", why)
        if conv.pending_tools:
            for use in conv.pending_tools:
                await self._run_tool(use, conv)
            return None
        if conv.done:
            assert conv.task is not None
            if conv.task.criteria or conv.task.checks:
                return await self._hand_to_evaluator(conv.round)
            return await self._end("completed", "", conv.final_text)
        if conv.last_stop == "refusal":
            return await self._end("failed", "the model refused to continue (stop_reason refusal)")
        if conv.last_stop is not None and conv.last_stop not in _CONTINUABLE:
            return await self._end("failed", f"the model stopped with stop_reason {conv.last_stop!r}")
        if conv.steps >= self.ctx.runaway_steps:
            return await self._end("failed", f"runaway: {conv.steps} model calls without finishing")
        if stop := self._guard() or await self._held():
            return await self._pause(stop)
        return await self._model_step(conv)

    async def _model_step(self, conv: Conversation) -> Outcome | None:
        step = conv.steps + 1
        horizon = self.records[-1].seq if self.records else 0
        model = self.ctx.model_for(self._model_spec(conv))
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "anthropic",
            "gen_ai.request.model": request_model(model.name),
            "gen_ai.request.max_tokens": self.ctx.max_output_tokens,
            "agentbus.step": step,
        }
        with tracing.span(
            f"chat {attrs['gen_ai.request.model']}",
            kind=SpanKind.CLIENT,
            session_id=self.sid,
            pool=self.ctx.pool,
            attributes=attrs,
        ) as span:
            try:
                reply = await model.respond(
                    session_id=self.sid,
                    system=self.ctx.system,
                    messages=conv.messages,
                    tools=self.ctx.tool_schemas,
                    max_tokens=self.ctx.max_output_tokens,
                )
            except ModelError as err:
                if err.retryable:
                    await self._model_failed(step, model.name, err)
                    raise
                logger.warning("session %s: model error: %s", self.sid, err)
                return await self._end("failed", f"model error: {err}")
            record_usage(span, reply.model, reply.usage, reply.stop_reason)
        await self._append(
            ModelResponded(
                id=f"step-{step}",
                step=step,
                model=reply.model,
                content=reply.content,
                stop_reason=reply.stop_reason,
                usage=reply.usage,
                cost_usd=(cost := cost_usd(reply.model, reply.usage)),
                round=conv.round,
                horizon=horizon,
            )
        )
        if cost > 0:
            try:
                await self.ctx.ledger.add(self.ctx.pool, cost)
            except AgentBusError as err:  # the session log has the cost; only the pool's total misses it
                logger.warning("session %s: pool spend not updated: %s", self.sid, err)
        return None

    async def _model_failed(self, step: int, model: str, err: ModelError) -> None:
        """A failure that may pass: say so where watchers look, then let the task be tried again."""
        last = self.job.attempt >= self.ctx.max_deliver
        retry_in = 0.0 if last else backoff(self.job.attempt)
        event = ModelCallFailed(
            id=f"model-failed-{step}-{self.job.seq}-{self.job.attempt}",
            step=step,
            model=model,
            error=str(err)[:2000],
            status=err.status,
            attempt=self.job.attempt,
            retry_in_s=retry_in,
        )
        await self._append(event)
        then = "giving up" if last else f"trying again in {retry_in:.0f}s"
        logger.warning("session %s: model call failed (attempt %d): %s; %s", self.sid, self.job.attempt, err, then)

    async def _run_tool(self, use: ToolUse, conv: Conversation) -> None:
        suffix = f"-rerun{self.job.attempt}" if use.started else ""
        await self._append(
            ToolCallStarted(
                id=f"step-{use.step}-start-{use.id}{suffix}",
                step=use.step,
                tool_use_id=use.id,
                name=use.name,
                input=use.input,
                rerun=use.started,
            )
        )
        ctx = ToolContext(
            session_id=self.sid,
            workspace=self._workspace(),
            step=use.step,
            tool_use_id=use.id,
            delegate=lambda prompt, pool: self._delegate(use, conv, prompt, pool),
            ask_human=lambda question: self._ask_human(use, question),
        )
        output, is_error = await self._call_tool(use, ctx)
        await self._append(
            ToolCallCompleted(
                id=f"step-{use.step}-result-{use.id}",
                step=use.step,
                tool_use_id=use.id,
                name=use.name,
                output=output,
                is_error=is_error,
            )
        )

    async def _call_tool(self, use: ToolUse, ctx: ToolContext) -> tuple[str, bool]:
        """The tool's output, or its error as text for the model (a tool never crashes the loop)."""
        tool: Tool | None = _CutOff() if use.truncated else self.ctx.tools.get(use.name)
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": use.name, "gen_ai.tool.call.id": use.id}
        with tracing.span(
            f"execute_tool {use.name}", session_id=self.sid, pool=self.ctx.pool, attributes=attrs
        ) as span:
            try:
                if tool is None:
                    raise ToolError(f"unknown tool {use.name!r}; this agent offers {', '.join(self.ctx.tools)}")
                return await tool.run(use.input, ctx), False
            except Released:
                raise
            except Exception as err:
                span.set_attribute("error.type", type(err).__name__)
                tracing.tool_errors.add(1, {"gen_ai.tool.name": use.name, tracing.POOL: self.ctx.pool})
                return (str(err) or type(err).__name__), True

    # --- tools that talk to the bus ---------------------------------------------------------------

    async def _ask_human(self, use: ToolUse, question: str) -> str:
        asked = next(
            (r for r in self.records if isinstance(r.event, QuestionAsked) and r.event.tool_use_id == use.id), None
        )
        if asked is None:  # a re-run waits from the original question, so an answer given meanwhile counts
            seq = (await self._append(QuestionAsked(id=f"question-{use.id}", text=question, tool_use_id=use.id))).seq
        else:
            seq = asked.seq
        claim = f"{self.job.seq}-{self.job.attempt}"
        await self._append(StatusChanged(id=f"waiting-{use.id}-{claim}", status="waiting", reason=question[:200]))
        answer: HumanMessage | None = None
        async for rec in self._follow(seq + 1):
            if isinstance(rec.event, HumanMessage):
                answer = rec.event
                break
            if isinstance(rec.event, CancelRequested):
                raise ToolError("the session was cancelled while waiting for an answer")
        assert answer is not None
        await self._append(StatusChanged(id=f"answered-{use.id}-{claim}", status="running", worker=self.ctx.worker_id))
        return human_text(answer)

    async def _delegate(self, use: ToolUse, conv: Conversation, prompt: str, pool: str | None) -> str:
        task = conv.task
        assert task is not None
        child = child_id(self.sid, use.id)
        await self._start_child(use, task, child, prompt, pool or self.ctx.pool)
        state = SessionState(session_id=child)
        async for rec in self._follow(1, session_id=child):
            state = fold(state, rec)
            if state.status in TERMINAL or state.status == "paused":
                break
        await self._append(
            DelegationCompleted(
                id=f"delegated-{use.id}",
                child_session=child,
                status=state.status,
                result=state.result,
                tool_use_id=use.id,
            )
        )
        if state.status == "paused":
            raise ToolError(f"subtask {child} is paused ({state.reason}); resume it or carry on without it")
        if state.status != "completed":
            raise ToolError(f"subtask {child} ended {state.status}: {state.reason}")
        return state.result

    async def _start_child(self, use: ToolUse, task: Task, child: str, prompt: str, target: str) -> None:
        """Record the delegation and open the child session (once per tool call, however late a re-run)."""
        depth = task.depth + 1
        if depth > self.ctx.max_depth:
            raise ToolError(f"delegation refused: depth limit {self.ctx.max_depth} reached")
        if not valid_token(target):
            raise ToolError(f"delegation refused: pool name {target!r} must be letters, digits, '-' or '_'")
        if not prompt.strip():
            raise ToolError("delegation refused: the subtask's prompt is empty")
        asked = {r.event.child_session for r in self.records if isinstance(r.event, DelegationRequested)}
        if len(asked) >= self.ctx.max_children and child not in asked:
            raise ToolError(f"delegation refused: this session already started {len(asked)} subtasks (the limit)")
        await self._append(
            DelegationRequested(
                id=f"delegate-{use.id}", child_session=child, pool=target, prompt=prompt, tool_use_id=use.id
            )
        )
        budget = remaining(effective_budget(self.ctx.pool_budget, self.records), self._state(), time.time())
        child_task = Task(
            session_id=child,
            prompt=prompt,
            pool=target,
            parent_session=self.sid,
            depth=depth,
            submitter=f"agent:{self.sid}",
            budget=budget,
        )
        await self.ctx.queues.open_session(child_task, trace_id=tracing.current_trace_id())

    # --- plumbing ---------------------------------------------------------------------------------

    async def _follow(self, start: int, session_id: str | None = None) -> AsyncIterator[Record]:
        """Tap a session live until the worker drains (then `Released`)."""
        tap = cast(AsyncGenerator[Record, None], self.log.tap(session_id or self.sid, start=start, follow=True))
        drain = asyncio.ensure_future(self.ctx.draining.wait())
        nxt: asyncio.Future[Record] | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(tap))
                done, _ = await asyncio.wait({nxt, drain}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    raise Released()
                yield nxt.result()
        finally:
            drain.cancel()
            if nxt is not None and not nxt.done():
                nxt.cancel()
                # Let the cancelled read finish: aclose() on a generator still running raises
                # RuntimeError, which would replace `Released` and become the tool's result.
                await asyncio.wait({nxt})
            await tap.aclose()

    async def _append(self, event: Event) -> PubAck:
        assert self.writer is not None
        try:
            ack = await self.writer.append(event)
        except FencedError:
            foreign = await self.writer.resync()
            if any(
                isinstance(r.event, ModelResponded | ToolCallStarted | SessionClaimed | SessionEnded) for r in foreign
            ):
                raise  # another agent is working on this session: it owns it now
            ack = await self.writer.append(event)
        return ack

    def _guard(self) -> Stop | None:
        """Budgets first, then no-progress; checked before every model call, from the log alone."""
        state = self._state()
        budget = effective_budget(self.ctx.pool_budget, self.records)
        return over_budget(budget, state, time.time()) or no_progress(self.records, self.ctx.no_progress_turns)

    async def _held(self) -> Stop | None:
        """A dollar ceiling over the whole pool (or fleet), set by the supervisor, pauses like a budget."""
        try:
            hold = await self.ctx.ledger.hold(self.ctx.pool)
        except AgentBusError as err:
            logger.warning("session %s: cannot read the pool's hold (%s); going on", self.sid, err)
            return None
        if hold is None:
            return None
        return Stop(hold.limit, f"{hold.detail}; raise the ceiling or `agentbus spend --reset POOL`, then resume")

    def _state(self) -> SessionState:
        state = SessionState(session_id=self.sid)
        for rec in self.records:
            state = fold(state, rec)
        return state

    async def _pause(self, stop: Stop) -> Outcome:
        """Park the session (status paused); `agentbus resume` raises the limit and queues it again."""
        resumes = sum(1 for r in self.records if isinstance(r.event, ResumeRequested))
        attrs = {"agentbus.budget.limit": stop.limit, "agentbus.budget.detail": stop.detail}
        with tracing.span("budget pause", attributes=attrs):
            event = BudgetExceeded(id=f"paused-{resumes}-{stop.limit}", limit=stop.limit, detail=stop.detail)
            await self._append(event)
        state = self._state()
        logger.info(
            "session %s paused: %s %s (steps %d, $%.4f)", self.sid, stop.limit, stop.detail, state.steps, state.cost_usd
        )
        return "ended"

    def _model_spec(self, conv: Conversation) -> str | None:
        """The session's own model (submit --model), else the one its route names, else the pool's."""
        if conv.task is not None and conv.task.model:
            return conv.task.model
        routed = [r.event for r in self.records if isinstance(r.event, Routed)]
        return routed[-1].model if routed and routed[-1].model else None

    async def _end(self, status: Literal["completed", "failed", "cancelled"], reason: str, result: str = "") -> Outcome:
        await self._append(SessionEnded(id="ended", status=status, reason=reason, result=result))
        tracing.sessions_ended.add(1, {"status": status, tracing.POOL: self.ctx.pool})
        state = self._state()
        logger.info(
            "session %s %s%s (steps %d, tool calls %d, $%.4f)",
            self.sid, status, f": {reason}" if reason else "", state.steps, state.tool_calls, state.cost_usd,
        )  # fmt: skip
        return "ended"

    async def _hand_to_evaluator(self, round_: int) -> Outcome:
        """The result goes to the evaluator; the session is not over until it says so."""
        await self._append(
            StatusChanged(
                id=f"evaluating-{round_}-{self.job.seq}-{self.job.attempt}",
                status="evaluating",
                reason=f"round {round_} result handed to the evaluator",
            )
        )
        await self.ctx.queues.enqueue(WorkItem(session_id=self.sid, reason="evaluate", round=round_), "evaluator")
        logger.info("session %s: round %d handed to the evaluator", self.sid, round_)
        return "ended"

    async def _refresh(self) -> None:
        start = self.records[-1].seq + 1 if self.records else 1
        self.records.extend(await self.log.read(self.sid, from_seq=start))

    def _workspace(self) -> Path:
        path = self.ctx.workdir / self.sid
        path.mkdir(parents=True, exist_ok=True)
        return path
