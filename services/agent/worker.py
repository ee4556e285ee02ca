"""The agent worker: pulls a pool's tasks and runs each session's tool-use loop, step by durable step.

Rules that make a crash harmless:
- every model response and tool result is in the log before the loop acts on it;
- the next request is rebuilt from the log, so a resumed agent sends what the dead one would have;
- the task's queue message is acked only after the session ended (or was handed on), and kept
  alive with in-progress acks while the model or a tool runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from opentelemetry.trace import Span, SpanKind

from agentbus import tracing
from agentbus.bus import Bus, Job
from agentbus.client import Client
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
    ModelResponded,
    QuestionAsked,
    Record,
    ResumeRequested,
    Routed,
    SessionClaimed,
    SessionEnded,
    StatusChanged,
    ToolCallCompleted,
    ToolCallStarted,
    Usage,
    WorkerInfo,
    WorkItem,
    encode,
    session_id_of,
)
from agentbus.models import ModelClient, ModelError, cost_usd, model_from_spec
from agentbus.sandbox import tool_environment
from agentbus.service import Service
from agentbus.session import SessionLog, SessionWriter
from agentbus.spend import SpendLedger
from agentbus.state import SessionState, fold
from agentbus.subjects import valid_token
from services.agent.conversation import Conversation, ToolUse, build, human_text
from services.agent.guards import (
    NO_PROGRESS_TURNS,
    Stop,
    effective_budget,
    no_progress,
    over_budget,
    remaining,
)
from services.agent.tools import DEFAULT_TOOLS, Tool, ToolContext, ToolError, load_tools, schemas, tool_sandbox

log = logging.getLogger("agentbus.agent")

DEFAULT_SYSTEM = (
    "You are an agent working inside agentbus. Use the tools to do the task in your session workspace. "
    "Messages marked [message from NAME] come from people watching the session: take them into account. "
    "When the task is done, reply with the final result and no tool call."
)

Outcome = Literal["ended", "released"]
# Stop reasons after which another call makes sense (end_turn: a human spoke since; the others by design).
_CONTINUABLE = frozenset({"end_turn", "tool_use", "max_tokens", "pause_turn"})


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How one agent process behaves; the CLI builds it from options."""

    pool: str
    model: str
    tools: tuple[str, ...] = DEFAULT_TOOLS
    workdir: Path = Path(".agentbus/work")
    concurrency: int = 4
    max_tokens: int = 4096
    system: str = DEFAULT_SYSTEM
    ack_wait_s: float = 60.0
    max_deliver: int = 5
    max_steps: int = 100  # a safety net; per-session budgets come with the supervisor
    max_depth: int = 3
    max_children: int = 8  # delegations per session, so a looping model cannot fork without end
    budget: Budget = Budget()  # noqa: RUF009 - frozen. The pool default; a session's own budget overrides it
    no_progress_turns: int = NO_PROGRESS_TURNS
    worker_id: str = field(
        # the random part: containers on the host network share the hostname and often the pid
        default_factory=lambda: (
            os.environ.get("AGENTBUS_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
    )
    heartbeat_s: float = 3.0
    # Where tools that run commands (bash, plug-ins that say so) run: "bwrap", or "none" (unconfined).
    sandbox: str = "bwrap"
    network: bool = False  # may those commands reach the network?
    tool_env: tuple[str, ...] = ()  # their environment allow-list: NAME (the agent's value) or NAME=VALUE


class Released(Exception):
    """The worker is draining: stop here, leave the task for another agent."""


class AgentWorker(Service):
    """Serves one pool: `run()` until `shutdown()` (safe twice); on shutdown, running sessions
    stop at their next step boundary and go back to the queue."""

    def __init__(self, bus: Bus, config: AgentConfig, model: ModelClient | None = None) -> None:
        if not valid_token(config.pool):
            raise AgentBusError(f"pool name {config.pool!r} must be letters, digits, '-' or '_'")
        self.bus = bus
        self.config = config
        self.log = SessionLog(bus)
        self.client = Client(bus)
        self.ledger = SpendLedger(bus)
        self.model = model or model_from_spec(config.model)
        self._models: dict[str, ModelClient] = {}
        self.tools: dict[str, Tool] = load_tools(config.tools)
        self.tool_schemas = schemas(self.tools)
        self.tool_env = tool_environment(config.tool_env, os.environ)
        self.sandbox = tool_sandbox(self.tools, config.sandbox)  # probed now: refused here, not mid-session
        self.consumer = bus.ns.pool_consumer(config.pool, ack_wait_s=config.ack_wait_s, max_deliver=config.max_deliver)
        super().__init__()
        self._inflight: set[asyncio.Task[None]] = set()
        self._unclaimed: list[Job] = []  # fetched after the drain began: given back untouched
        self.sessions: set[str] = set()
        self.served = 0

    def model_for(self, spec: str | None) -> ModelClient:
        """The pool's model, or a per-session one (cost routing), built once per spec."""
        if spec is None or spec == self.model.name:
            return self.model
        if spec not in self._models:
            self._models[spec] = model_from_spec(spec)
        return self._models[spec]

    async def _serve(self) -> None:
        await self.bus.provision()
        puller = await self.bus.pull(self.consumer)
        watcher = asyncio.create_task(self._watch_exhausted())
        beat = asyncio.create_task(self._heartbeat())
        log.info("agent %s serving pool %s with %s", self.config.worker_id, self.config.pool, self.model.name)
        try:
            while not self._draining.is_set():
                free = self.config.concurrency - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for job in await puller.fetch(free, timeout=1.0):
                    if self._draining.is_set():
                        self._unclaimed.append(job)
                        continue
                    task = asyncio.create_task(self._handle(job))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
        finally:
            # No fetch is waiting any more, so a nak cannot come straight back to this agent.
            for job in self._unclaimed:
                with contextlib.suppress(Exception):
                    await job.nak()
            if self._inflight:
                await asyncio.wait(self._inflight)
            watcher.cancel()
            beat.cancel()
            # A courtesy (the registry's TTL drops the entry anyway): never wait out a failover
            # for it while stopping, as when NATS went away first.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.kv_delete(self.bus.ns.workers_bucket, self.config.worker_id), 2.0)
            await puller.close()
            log.info("agent %s stopped after %d sessions", self.config.worker_id, self.served)

    async def _heartbeat(self) -> None:
        """Announce this worker in the registry; the bucket's TTL forgets it if the beats stop."""
        started = time.time()
        while True:
            info = WorkerInfo(
                worker_id=self.config.worker_id,
                pool=self.config.pool,
                model=self.model.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                container=os.environ.get("AGENTBUS_CONTAINER", ""),
                sessions=tuple(sorted(self.sessions)),
                started_ts=started,
                heartbeat_ts=time.time(),
            )
            with contextlib.suppress(Exception):
                await self.bus.kv_put(self.bus.ns.workers_bucket, self.config.worker_id, encode(info))
            await asyncio.sleep(self.config.heartbeat_s)

    # --- one queue message ------------------------------------------------------------------

    async def _handle(self, job: Job) -> None:
        item = await self.log.accept_work(job)
        if item is None:
            return
        run = SessionRun(self, item.session_id, job)
        self.sessions.add(item.session_id)
        attrs = {**tracing.messaging_attrs(job.subject, operation="process"), "agentbus.attempt": job.attempt}
        try:
            with tracing.span(
                f"process {self.config.pool}",
                kind=SpanKind.CONSUMER,
                parent=job.trace_context,
                session_id=item.session_id,
                pool=self.config.pool,
                attributes=attrs,
            ):
                outcome = await run.execute()
        except Released:
            outcome = "released"  # drained while waiting for a human or a subtask: not a failed attempt
        except Exception as err:
            await self._failed_attempt(job, item.session_id, err)
            return
        finally:
            self.sessions.discard(item.session_id)
        if outcome == "ended":
            await job.ack()
            self.served += 1
        else:
            await self._hand_back(job, item.session_id)

    async def _hand_back(self, job: Job, sid: str) -> None:
        """Draining: queue a fresh item for the session, then ack this one.

        A nak would cost the task one of its deliveries per drain (deploys would slowly
        fail long sessions) and, sent late, could hand it to a second agent while a
        first already has it. The new item is stored before the old one is acked.
        """
        item = WorkItem(session_id=sid, reason="resume")
        msg_id = f"{sid}:handback:{job.seq}:{job.attempt}"
        await self.bus.publish(self.bus.ns.work(self.config.pool), encode(item), msg_id=msg_id)
        await job.ack()

    async def _failed_attempt(self, job: Job, sid: str, err: Exception) -> None:
        if isinstance(err, FencedError):
            log.warning("session %s: another agent owns it now (%s); leaving it", sid, err)
            await job.nak(delay=self.config.ack_wait_s)
            return
        log.exception("session %s attempt %d failed", sid, job.attempt)
        if job.attempt >= self.config.max_deliver:
            reason = f"gave up after {job.attempt} attempts; last error: {type(err).__name__}: {err}"
            await self.log.append(sid, SessionEnded(id="ended", status="failed", reason=reason))
            await job.term()
        else:
            await job.nak(delay=min(2.0**job.attempt, 30.0))

    async def _watch_exhausted(self) -> None:
        """A task whose last delivery died with its agent: fail the session so nobody waits forever.

        The server's advisories are kept in a stream (see subjects.md), so one sent while no agent
        of the pool ran is handled by the next agent to start. Where that stream could not be
        made, this agent listens to the announcements live instead.
        """
        while True:
            try:
                puller = await self.bus.pull(self.bus.ns.exhausted_consumer(self.config.pool))
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if await self._exists_or_unknown(self.bus.ns.exhausted_stream):
                    log.warning("cannot read stored advisories yet (%s); trying again", err)
                    await asyncio.sleep(1.0)
                    continue
                log.warning("no %s stream; listening for advisories live instead", self.bus.ns.exhausted_stream)
                await self._listen_exhausted()
                return
            try:
                while True:
                    for job in await puller.fetch(1, timeout=5.0):
                        try:
                            await self._record_exhausted(job.data)
                        except AgentBusError as err:
                            log.warning("exhausted task advisory not recorded yet: %s", err)
                            await job.nak(delay=1.0)
                        else:
                            await job.ack()
            except asyncio.CancelledError:
                raise
            except Exception:  # a watcher that dies quietly would leave every later exhaustion unfailed
                log.exception("watching exhausted tasks of pool %s; starting again", self.config.pool)
                await asyncio.sleep(1.0)
            finally:
                await puller.close()

    async def _exists_or_unknown(self, stream: str) -> bool:
        try:
            return await self.bus.stream_exists(stream)
        except AgentBusError:
            return True  # can't tell now: keep trying the durable way

    async def _listen_exhausted(self) -> None:
        async for advisory in self.bus.announcements(self.bus.ns.exhausted(self.config.pool)):
            try:
                await self._record_exhausted(advisory)
            except AgentBusError as err:
                log.warning("exhausted task not recorded: %s", err)

    async def _record_exhausted(self, advisory: bytes) -> None:
        try:
            seq = int(json.loads(advisory)["stream_seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable max-deliveries advisory dropped: %r", advisory[:200])
            return
        stream = self.consumer.stream
        data = await self.bus.get_stored(stream, seq)
        if data is None:
            return  # already handled: the task is gone from the queue
        sid = session_id_of(data)
        if sid and await self.log.exists(sid):
            reason = f"gave up: delivered {self.config.max_deliver} times and never finished (max_deliver)"
            await self.log.append(sid, SessionEnded(id="ended", status="failed", reason=reason))
        await self.bus.delete_stored(stream, seq)


class _CutOff:
    """Stands in for a tool whose call was cut off by max_tokens: its input cannot be trusted."""

    name = "cut_off"
    description = ""
    input_schema: dict[str, Any] = {}

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        raise ToolError("not run: your reply hit the output token limit before this call was complete; send it again")


def _request_model(spec: str) -> str:
    scheme, _, rest = spec.partition(":")
    return rest if scheme == "anthropic" else scheme


def _record_usage(span: Span, model: str, usage: Usage, stop_reason: str | None) -> None:
    """GenAI semantic-convention attributes on the span, and the same figures as metrics."""
    span.set_attributes(
        {
            "gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": [stop_reason or ""],
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
        }
    )
    labels = {"gen_ai.response.model": model}
    tracing.model_calls.add(1, labels)
    for kind, count in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_creation", usage.cache_creation_input_tokens),
        ("cache_read", usage.cache_read_input_tokens),
    ):
        tracing.tokens.add(count, {**labels, "gen_ai.token.type": kind})
    tracing.dollars.add(cost_usd(model, usage), labels)


def _child_id(sid: str, tool_use_id: str) -> str:
    return f"{sid[:40]}-{hashlib.sha256(tool_use_id.encode()).hexdigest()[:10]}"


# --- one session ------------------------------------------------------------------------------


class SessionRun:
    """Runs one session from wherever its log stands to an end, or to a drain."""

    def __init__(self, worker: AgentWorker, session_id: str, job: Job) -> None:
        self.w = worker
        self.sid = session_id
        self.job = job
        self.log = worker.log
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
            worker=self.w.config.worker_id,
            attempt=self.job.attempt,
            round=conv.round,
            workspace=str(self._workspace().resolve()),
        )
        await self._append(claim)
        async with self.job.kept_alive(self.w.config.ack_wait_s / 3):
            return await self._loop()

    async def _loop(self) -> Outcome:
        while True:
            if self.w._draining.is_set():
                return "released"
            conv = build(self.records)
            if conv.ended:
                return "ended"  # ended elsewhere (evaluator, a give-up record): nothing left to do
            if conv.cancel:
                why = f"cancelled by {conv.cancel.author}" + (f": {conv.cancel.reason}" if conv.cancel.reason else "")
                return await self._end("cancelled", why)
            if conv.pending_tools:
                for use in conv.pending_tools:
                    await self._run_tool(use, conv)
            elif conv.done:
                assert conv.task is not None
                if conv.task.criteria or conv.task.checks:
                    return await self._hand_to_evaluator(conv.round)
                return await self._end("completed", "", conv.final_text)
            elif conv.last_stop == "refusal":
                return await self._end("failed", "the model refused to continue (stop_reason refusal)")
            elif conv.last_stop is not None and conv.last_stop not in _CONTINUABLE:
                return await self._end("failed", f"the model stopped with stop_reason {conv.last_stop!r}")
            elif conv.steps >= self.w.config.max_steps:
                return await self._end("failed", f"max_steps: {conv.steps} model calls without finishing")
            elif stop := self._guard() or await self._held():
                return await self._pause(stop)
            else:
                outcome = await self._model_step(conv)
                if outcome:
                    return outcome
            await self._refresh()

    async def _model_step(self, conv: Conversation) -> Outcome | None:
        step = conv.steps + 1
        horizon = self.records[-1].seq if self.records else 0
        model = self.w.model_for(self._model_spec(conv))
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "anthropic",
            "gen_ai.request.model": _request_model(model.name),
            "gen_ai.request.max_tokens": self.w.config.max_tokens,
            "agentbus.step": step,
        }
        with tracing.span(
            f"chat {attrs['gen_ai.request.model']}",
            kind=SpanKind.CLIENT,
            session_id=self.sid,
            pool=self.w.config.pool,
            attributes=attrs,
        ) as span:
            try:
                reply = await model.respond(
                    session_id=self.sid,
                    system=self.w.config.system,
                    messages=conv.messages,
                    tools=self.w.tool_schemas,
                    max_tokens=self.w.config.max_tokens,
                )
            except ModelError as err:
                if err.retryable:
                    raise
                return await self._end("failed", f"model error: {err}")
            _record_usage(span, reply.model, reply.usage, reply.stop_reason)
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
                await self.w.ledger.add(self.w.config.pool, cost)
            except AgentBusError as err:  # the session log has the cost; only the pool's total misses it
                log.warning("session %s: pool spend not updated: %s", self.sid, err)
        return None

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
            sandbox=self.w.sandbox,
            network=self.w.config.network,
            tool_env=self.w.tool_env,
        )
        tool: Tool | None = _CutOff() if use.truncated else self.w.tools.get(use.name)
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": use.name, "gen_ai.tool.call.id": use.id}
        with tracing.span(
            f"execute_tool {use.name}", session_id=self.sid, pool=self.w.config.pool, attributes=attrs
        ) as span:
            try:
                if tool is None:
                    raise ToolError(f"unknown tool {use.name!r}; this agent offers {', '.join(self.w.tools)}")
                output, is_error = await tool.run(use.input, ctx), False
            except Released:
                raise
            except Exception as err:
                output, is_error = (str(err) or type(err).__name__), True
                span.set_attribute("error.type", type(err).__name__)
                tracing.tool_errors.add(1, {"gen_ai.tool.name": use.name, tracing.POOL: self.w.config.pool})
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
        await self._append(
            StatusChanged(id=f"answered-{use.id}-{claim}", status="running", worker=self.w.config.worker_id)
        )
        return human_text(answer)

    async def _delegate(self, use: ToolUse, conv: Conversation, prompt: str, pool: str | None) -> str:
        task = conv.task
        assert task is not None
        depth = task.depth + 1
        if depth > self.w.config.max_depth:
            raise ToolError(f"delegation refused: depth limit {self.w.config.max_depth} reached")
        asked = {r.event.child_session for r in self.records if isinstance(r.event, DelegationRequested)}
        if len(asked) >= self.w.config.max_children and _child_id(self.sid, use.id) not in asked:
            raise ToolError(f"delegation refused: this session already started {len(asked)} subtasks (the limit)")
        child = _child_id(self.sid, use.id)
        target = pool or self.w.config.pool
        await self._append(
            DelegationRequested(
                id=f"delegate-{use.id}", child_session=child, pool=target, prompt=prompt, tool_use_id=use.id
            )
        )
        # A re-run finds the child it started before: one child per tool call, however late.
        if not await self.log.exists(child):
            await self.w.client.submit(
                prompt,
                pool=target,
                parent_session=self.sid,
                depth=depth,
                session_id=child,
                submitter=f"agent:{self.sid}",
                budget=remaining(effective_budget(self.w.config.budget, self.records), self._state(), time.time()),
            )
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

    # --- plumbing ---------------------------------------------------------------------------------

    async def _follow(self, start: int, session_id: str | None = None) -> AsyncIterator[Record]:
        """Tap a session live until the worker drains (then `Released`)."""
        tap = cast(AsyncGenerator[Record, None], self.log.tap(session_id or self.sid, start=start, follow=True))
        drain = asyncio.ensure_future(self.w._draining.wait())
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

    async def _append(self, event: Event) -> Any:
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
        budget = effective_budget(self.w.config.budget, self.records)
        return over_budget(budget, state, time.time()) or no_progress(self.records, self.w.config.no_progress_turns)

    async def _held(self) -> Stop | None:
        """A dollar ceiling over the whole pool (or fleet), set by the supervisor, pauses like a budget."""
        try:
            hold = await self.w.ledger.hold(self.w.config.pool)
        except AgentBusError as err:
            log.warning("session %s: cannot read the pool's hold (%s); going on", self.sid, err)
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
        log.info("session %s paused: %s %s", self.sid, stop.limit, stop.detail)
        return "ended"

    def _model_spec(self, conv: Conversation) -> str | None:
        """The session's own model (submit --model), else the one its route names, else the pool's."""
        if conv.task is not None and conv.task.model:
            return conv.task.model
        routed = [r.event for r in self.records if isinstance(r.event, Routed)]
        return routed[-1].model if routed and routed[-1].model else None

    async def _end(self, status: Literal["completed", "failed", "cancelled"], reason: str, result: str = "") -> Outcome:
        await self._append(SessionEnded(id="ended", status=status, reason=reason, result=result))
        tracing.sessions_ended.add(1, {"status": status, tracing.POOL: self.w.config.pool})
        return "ended"

    async def _hand_to_evaluator(self, round_: int) -> Outcome:
        """The result goes to the evaluator; the session is not over until it says so."""
        await self._append(
            StatusChanged(
                id=f"evaluating-{round_}-{self.job.seq}-{self.job.attempt}",
                status="evaluating",
                reason=f"round {round_} result",
            )
        )
        item = WorkItem(session_id=self.sid, reason="evaluate", round=round_)
        await self.w.bus.publish(self.w.bus.ns.evaluations(), encode(item), msg_id=f"{self.sid}:evaluate:{round_}")
        return "ended"

    async def _refresh(self) -> None:
        start = self.records[-1].seq + 1 if self.records else 1
        self.records.extend(await self.log.read(self.sid, from_seq=start))

    def _workspace(self) -> Path:
        path = self.w.config.workdir / self.sid
        path.mkdir(parents=True, exist_ok=True)
        return path


async def serve(bus: Bus, config: AgentConfig, stop: asyncio.Event, *, model: ModelClient | None = None) -> None:
    """Run a worker until `stop` is set, then drain it."""
    worker = AgentWorker(bus, config, model)
    runner = asyncio.create_task(worker.run())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        await worker.shutdown()
    waiter.cancel()
    await runner
    for model in (worker.model, *worker._models.values()):
        closer: Callable[[], Awaitable[None]] | None = getattr(model, "aclose", None)
        if closer:
            await closer()
