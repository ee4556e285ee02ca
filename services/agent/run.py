"""One session's run, from wherever its log stands to an end, a pause, a park or a hand-back.

Rules that make a crash harmless:
- every model response and tool result is in the log before the loop acts on it;
- the next request is rebuilt from the log, so a resumed agent sends what the dead one would have;
- the task's queue message is acked only after the session ended, parked or was handed on.

A session that waits for a person or a subtask is parked: the run records what it waits
for and returns, the queue message is acked, and the slot serves other sessions. The
answer queues the session again (`wake.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opentelemetry.trace import SpanKind

from agentbus import allowlist, openings, rejects, tracing
from agentbus.budget import Stop
from agentbus.bus import Job, PubAck
from agentbus.errors import AgentBusError, FencedError
from agentbus.messages import (
    Budget,
    BudgetExceeded,
    Event,
    InputRejected,
    InterruptRequested,
    InvalidEvent,
    MessageDelivered,
    ModelCallFailed,
    ModelResponded,
    OpinionsAggregated,
    Record,
    ResumeRequested,
    RevisionRequested,
    Routed,
    SessionClaimed,
    SessionEnded,
    SessionPaused,
    StatusChanged,
    ToolCallStarted,
    UnknownEvent,
    VerdictRecorded,
    WorkItem,
    ended_id,
    event_type,
)
from agentbus.models import ModelClient, ModelError, ModelReply, Partial, cost_usd
from agentbus.queues import WorkQueues
from agentbus.sandbox import Sandbox
from agentbus.service import backoff
from agentbus.session import SessionLog, SessionWriter
from agentbus.spend import HoldWatch, SpendBatch
from agentbus.state import SessionState
from services.agent import repo_workspace
from services.agent.calls import ToolCalls
from services.agent.conversation import Conversation, affects, build
from services.agent.guards import Guards
from services.agent.signals import Interrupted, Parked, Released
from services.agent.telemetry import record_usage, request_model
from services.agent.tools import Tool
from services.agent.transcript import Transcript

logger = logging.getLogger("agentbus.agent")

Outcome = Literal["ended", "released", "parked", "skipped"]
# Stop reasons after which another call makes sense (end_turn: a human spoke since; the others by design).
_CONTINUABLE = frozenset({"end_turn", "tool_use", "max_tokens", "pause_turn", "interrupted"})
# Reasons to queue a session that only make sense while it is parked; otherwise the item is stale.
WAKE_REASONS = frozenset({"wake", "child_result", "timeout"})
_INTERRUPT_LOOK_S = 2.0  # how often a running activity asks itself whether it should look for an interrupt
# Log records that say nothing of whether a run went on after it stopped: others write them (a
# rejection of bad input, the evaluator's verdict and revision, a route, a fan-out's aggregate).
_UNUSABLE = (InvalidEvent, UnknownEvent)  # what `rejects.why_unusable` may find unusable
_NEUTRAL = (InputRejected, VerdictRecorded, RevisionRequested, Routed, OpinionsAggregated)


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a session run may use of its worker, and nothing more."""

    worker_id: str
    pool: str
    log: SessionLog
    queues: WorkQueues
    holds: HoldWatch
    spend: SpendBatch  # this agent's costs, added to the pool's total in batches
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
    pool_model: str = ""  # the pool's own model; a session may name another only if it is allowed
    allowed_models: tuple[str, ...] = ()
    approve: frozenset[str] = frozenset()
    sandbox: Sandbox | None = None  # where tools that run commands run (None: such tools refuse)
    network: bool = False
    people_live: asyncio.Event | None = None  # the worker hears people's messages live (Transcript)
    tool_env: Mapping[str, str] = field(default_factory=dict)
    approval_timeout_s: float | None = None
    on_approval_timeout: Literal["deny", "pause"] = "deny"
    repo: repo_workspace.SessionRepos | None = None  # issue 19: sessions work in worktrees of this repository
    work_key: openings.WorkKey | None = None  # verifies the openings routed work items carry


class SessionRun:
    """Runs one session from wherever its log stands to an end, a park, or a drain."""

    def __init__(self, ctx: RunContext, session_id: str, job: Job, item: WorkItem) -> None:
        self.ctx = ctx
        self.sid = session_id
        self.job = job
        self.item = item
        self.log = ctx.log
        self.transcript = Transcript(ctx.log, session_id, ctx.people_live)
        self.writer: SessionWriter | None = None
        self.calls = ToolCalls(self)
        self._activity: asyncio.Task[Any] | None = None  # the model call or tool run in flight
        self._interrupting: InterruptRequested | None = None
        self.interrupted_by: str | None = None  # who stopped the last activity
        self._built: tuple[Conversation, int, Record | None] | None = None  # the last build, and what it read
        self._guards: Guards | None = None  # made at the first model call: most runs' items end before one
        self._unsure_end: SessionEnded | None = None  # sent behind an answer, not known to be stored

    @property
    def claim(self) -> str:
        """This delivery of the session's queue message: part of ids written once per claim."""
        return f"{self.job.seq}-{self.job.attempt}"

    @property
    def records(self) -> list[Record]:
        return self.transcript.records

    async def execute(self) -> Outcome:
        if (opened := await self._opened()) is not None:
            return opened
        await self.transcript.load()
        return await self._start()

    async def _opened(self) -> Outcome | None:
        """A fresh session whose work item carries a verified opening (`agentbus.openings`): claimed
        without reading it, the claim fenced on the whole session at the route. None when it must be
        read instead: no opening, or one that does not verify, anything but a plain first start, or
        anything written to the session since the route (a person's message, a cancel)."""
        opening, key = self.item.opening, self.ctx.work_key
        if opening is None or key is None or self.job.attempt != 1 or self.item.reason != "new":
            return None
        if not self.log.bus.fences_on_wildcards:  # the claim could not be fenced on the whole session
            return None
        records = await openings.opened(key, self.log.bus, self.sid, opening)
        if records is None:
            return None
        self.transcript.open(records)
        conv = self.conversation()
        if conv.task is None or conv.ended or conv.steps or self.state().terminal:
            self._built = None
            return None
        self.writer = SessionWriter(self.log, self.sid, opening.routed_seq)
        claim = self._claim_event(conv)
        try:
            ack = await self.writer.append(claim, whole_session=True)
        except FencedError:
            logger.debug("session %s: written to since it was routed; reading it", self.sid)
            self._built = None
            return None
        self.transcript.appended(ack, claim)
        return await self._claimed(conv)

    async def _start(self) -> Outcome:
        if not self.records:
            await self.ctx.queues.unseen(self.job, self.item)  # the item overtook its session: it waits
        conv = self.conversation()
        if conv.task is None:  # no valid session_created first: it can never start; end it, saying why
            await self.ctx.queues.refuse_taskless(self.sid, self.records, self.job.subject)
            return "ended"
        if conv.ended or self.state().terminal:  # ended, or cancelled before anyone took it
            done = self.state()  # in case a crash lost it
            await self.ctx.queues.settled(self.sid, conv.task.parent_session, status=done.status, turn=done.turn)
            return "ended"
        earlier = self._earlier_delivery() if self.job.attempt > 1 else None
        if earlier is not None and earlier != "went on":
            await self._settle_stop(earlier)  # its ack was lost: the stop stands, its follow-ups are redone
            return "skipped"
        if earlier is None and self.item.reason in WAKE_REASONS and not self.state().parked:
            return "skipped"  # woken twice, or the session moved on: nothing waits for this
        last_log = max((r.seq for r in self.records if r.channel == "log"), default=0)
        self.writer = SessionWriter(self.log, self.sid, last_log)
        await self.append(self._claim_event(conv))
        return await self._claimed(conv)

    def _claim_event(self, conv: Conversation) -> SessionClaimed:
        return SessionClaimed(
            id=f"claim-{self.claim}",
            worker=self.ctx.worker_id,
            attempt=self.job.attempt,
            round=conv.round,
            workspace=str(self.workspace(create=False)),  # made when a tool first needs it
        )

    async def _claimed(self, conv: Conversation) -> Outcome:
        """Everything after the claim: from here the run owns the session."""
        await self._answer_unusable()
        if self.job.attempt == 1 and conv.steps == 0:
            logger.info("session %s started on pool %s", self.sid, self.ctx.pool)
        else:
            logger.info("session %s continues at step %d (%s, attempt %d)", self.sid, conv.steps, self.item.reason,
                        self.job.attempt)  # fmt: skip
        if (prepared := await repo_workspace.prepare(self, conv)) is not None:  # issue 19: the worktree
            return prepared
        try:
            return await self._loop()
        except Parked as parked:
            logger.info("session %s parked: %s", self.sid, parked)
            return "parked"

    def _earlier_delivery(self) -> Record | SessionClaimed | Literal["went on"] | None:
        """What an earlier delivery of this queue message left, when it comes again (its ack lost
        with the connection, the agent dead, or its run failed and the task was given back):

        - None: it never claimed the session (the usual checks apply);
        - a later claim: another delivery has the session since, and settles it;
        - the pause or the hand-off to the evaluator its run ended with (the last record on `.log`
          after its claim that others did not write): the stop stands;
        - "went on": its run was under way (or parked: a park is looked at again by claiming,
          as what it waits for may have come before the park was recorded); this delivery
          claims and goes on from the log, whatever its reason.

        Claiming again after a pause made an interrupted session go on by itself and left a
        budget pause looking like a run nobody ran."""
        prefix = f"claim-{self.job.seq}-"
        mine = [i for i, r in enumerate(self.records) if isinstance(r.event, SessionClaimed)
                and r.event.id.startswith(prefix)]  # fmt: skip
        if not mine:
            return None
        stop: Record | None = None
        for rec in self.records[mine[-1] + 1 :]:
            ev = rec.event
            if isinstance(ev, SessionClaimed):
                return ev  # superseded: that delivery settles the session
            if rec.channel != "log" or isinstance(ev, _NEUTRAL):
                continue
            is_stop = isinstance(ev, SessionPaused | BudgetExceeded) or (
                isinstance(ev, StatusChanged) and ev.status == "evaluating"
            )
            stop = rec if is_stop else None  # anything else on the log: the run went on
        return stop if stop is not None else "went on"

    async def _settle_stop(self, stop: Record | SessionClaimed) -> None:
        """Redo, idempotently, what the run did after recording its stop, while the session is still
        there: tell a waiting parent of a pause, queue the evaluation."""
        if isinstance(stop, SessionClaimed):
            return
        ev, state = stop.event, self.state()
        logger.info("session %s: task %d delivered again after its run stopped (%s); nothing to run",
                    self.sid, self.job.seq, event_type(ev))  # fmt: skip
        if isinstance(ev, SessionPaused | BudgetExceeded) and state.status == "paused":
            await self.ctx.queues.settled(self.sid, state.parent_session, status="paused", turn=state.turn)
        elif isinstance(ev, StatusChanged) and state.status == "evaluating":
            item = WorkItem(session_id=self.sid, reason="evaluate", round=state.round)
            await self.ctx.queues.enqueue(item, "evaluator")

    async def _answer_unusable(self) -> None:
        """Say so, once, for each record on the log channel nothing can use (a newer version's event
        excepted); people's channels are answered by the wake watchers as they arrive."""
        unusable = [r for r in self.records if isinstance(r.event, _UNUSABLE) and r.channel == "log"]
        if not unusable:  # the usual case, and a resume's thousand records are looked at once here
            return
        answered = {r.event.id for r in self.records if isinstance(r.event, InputRejected)}
        subject = self.log.ns.session_log(self.sid)
        for rec in unusable:
            why = rejects.why_unusable(rec.event)
            if why is not None and f"input-rejected-{rec.seq}" not in answered:
                await self.append(rejects.rejection(rec.seq, subject, why))
                logger.info("session %s: log record #%d cannot be used: %s", self.sid, rec.seq, why)

    def interrupt(self, event: InterruptRequested) -> None:
        """Stop what is in flight now (called by the worker when the interrupt arrives live); the
        loop then sees the interrupt in the log and continues with its text or pauses."""
        if self._activity is not None and not self._activity.done():
            self._interrupting = event
            self._activity.cancel()

    async def _loop(self) -> Outcome:
        while True:
            if self.ctx.draining.is_set():
                return "released"
            conv = self.conversation()
            if conv.ended:
                return "ended"  # ended elsewhere (evaluator, a give-up record): nothing left to do
            outcome = await self._next(conv)
            if outcome is not None:
                return outcome
            await self.transcript.catch_up()  # what people wrote meanwhile: one lookup if nothing

    async def _next(self, conv: Conversation) -> Outcome | None:
        """Do the one thing the log says comes next; an outcome when the run is over."""
        if conv.cancel:
            why = f"cancelled by {conv.cancel.author}" + (f": {conv.cancel.reason}" if conv.cancel.reason else "")
            await self.calls.close_waiting(conv, f"not finished: the session was {why}")
            return await self.end("cancelled", why)
        if conv.interrupt is not None:
            assert isinstance(conv.interrupt.event, InterruptRequested)
            return await self.pause("interrupted", f"by {conv.interrupt.event.author}", f"i{conv.interrupt.seq}")
        if conv.pending_tools:
            for use in conv.pending_tools:
                if await self.calls.run_call(use, conv) == "paused":
                    return "ended"
            return None
        if conv.done:
            assert conv.task is not None
            await repo_workspace.commit_round(self, conv)  # issue 19: the round's changes, on the branch
            if conv.task.criteria or conv.task.checks:
                return await self._hand_to_evaluator(conv.round)
            return await self.end("completed", "", conv.final_text)
        if conv.last_stop == "refusal":
            return await self.end("failed", "the model refused to continue (stop_reason refusal)")
        if conv.last_stop is not None and conv.last_stop not in _CONTINUABLE:
            return await self.end("failed", f"the model stopped with stop_reason {conv.last_stop!r}")
        if conv.steps >= self.ctx.runaway_steps:
            return await self.end("failed", f"runaway: {conv.steps} model calls without finishing")
        if stop := self._guard() or await self._held():
            return await self._budget_pause(stop)
        return await self._model_step(conv)

    # --- the model call -----------------------------------------------------------------------------

    async def _model_step(self, conv: Conversation) -> Outcome | None:
        step = conv.steps + 1
        await self._deliver(conv, step)
        horizon = self.records[-1].seq if self.records else 0
        spec = self._model_spec(conv)
        if refused := allowlist.refusal(spec, self.ctx.pool, self.ctx.pool_model, self.ctx.allowed_models):
            logger.warning("session %s refused: %s", self.sid, refused)
            return await self.end("failed", refused)
        model = self.ctx.model_for(spec)
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "anthropic",
            "gen_ai.request.model": request_model(model.name),
            "gen_ai.request.max_tokens": self.ctx.max_output_tokens,
            "agentbus.step": step,
        }
        name = f"chat {attrs['gen_ai.request.model']}"
        with tracing.span(
            name, kind=SpanKind.CLIENT, session_id=self.sid, pool=self.ctx.pool, attributes=attrs
        ) as span:
            partial = Partial()
            try:
                reply = await self.activity(
                    model.respond(
                        session_id=self.sid,
                        system=self.ctx.system,
                        messages=conv.messages,
                        tools=self.ctx.tool_schemas,
                        max_tokens=self.ctx.max_output_tokens,
                        partial=partial,
                    )
                )
            except Interrupted:
                reply = ModelReply(content=partial.content, stop_reason="interrupted", usage=partial.usage,
                                   model=partial.model or request_model(model.name))  # fmt: skip
            except ModelError as err:
                if err.retryable:
                    await self._model_failed(step, model.name, err)
                    raise
                logger.warning("session %s: model error: %s", self.sid, err)
                return await self.end("failed", f"model error: {err}")
            record_usage(span, reply.model, reply.usage, reply.stop_reason)
        cost = cost_usd(reply.model, reply.usage)
        responded = ModelResponded(
            id=f"step-{step}",
            step=step,
            model=reply.model,
            content=reply.content,
            stop_reason=reply.stop_reason,
            usage=reply.usage,
            cost_usd=cost,
            round=conv.round,
            horizon=horizon,
        )
        end = self._end_behind(responded)
        ended = await self._append_ending(responded, end) if end is not None else False
        if end is None:
            await self.append(responded)
        if cost > 0:
            self.ctx.spend.add(cost)
        return await self._ended("completed", "") if ended else None

    def _end_behind(self, responded: ModelResponded) -> SessionEnded | None:
        """The end the next step boundary would write after `responded`, when it is sure to: a
        final answer, nobody's word pending or heard since the last look, a pool without a
        repository, a task without criteria or checks, no drain. It then goes right behind the
        answer (`_append_ending`); anything else takes the step-by-step way (`_next`)."""
        if responded.stop_reason != "end_turn" or self.ctx.repo is not None or self.ctx.draining.is_set():
            return None
        if not (self.log.bus.one_server and self.log.bus.fences_on_wildcards):  # `Bus.publish_chained`
            return None
        if self.transcript.must_look():  # people may have written: the boundary reads first
            return None
        at = self.records[-1].seq + 1 if self.records else 1
        conv = build([*self.records, Record(seq=at, session_id=self.sid, channel="log", event=responded)])
        task = conv.task
        if not conv.done or conv.ended or conv.cancel or conv.interrupt is not None or task is None:
            return None
        if task.criteria or task.checks:
            return None
        return SessionEnded(id=ended_id(self.state().turn), status="completed", reason="", result=conv.final_text)

    async def _append_ending(self, responded: ModelResponded, end: SessionEnded) -> bool:
        """`responded`, then `end` in the same round trip, the end stored only if nothing came
        between them and no people's record this run has not seen is stored
        (`SessionWriter.append_then`); whether the end is recorded. If not, the answer is, and the
        step boundary decides as always (a people's record is read there, and an end is written as
        this same event: should this one land late after all, it is found as the run's own)."""
        assert self.writer is not None
        try:
            ack, after, unseen = await self.writer.append_then(
                responded, end, people_seq=self.transcript.people_seq(), attempt=self.claim
            )
        except FencedError:  # a writer came between: the owner's usual way (resync, merge or stop)
            await self.append(responded)
            return False
        self.transcript.appended(ack, responded)
        if unseen:  # the server says a person wrote that this run has not read (a missed signal)
            self.transcript.told()  # the step boundary reads it, as after a signal
        if after is None:
            self._unsure_end = end
            return False
        self.transcript.appended(after, end)
        return True

    async def _deliver(self, conv: Conversation, step: int) -> None:
        """Receipts: each human message going into this request, recorded before it is sent."""
        for rec in conv.undelivered:
            event_id = getattr(rec.event, "id", "")
            await self.append(
                MessageDelivered(id=f"delivered-{rec.seq}", message_seq=rec.seq, message_id=event_id, step=step)
            )

    async def _model_failed(self, step: int, model: str, err: ModelError) -> None:
        """A failure that may pass: say so where watchers look, then let the task be tried again."""
        last = self.job.attempt >= self.ctx.max_deliver
        retry_in = 0.0 if last else backoff(self.job.attempt)
        event = ModelCallFailed(
            id=f"model-failed-{step}-{self.claim}",
            step=step,
            model=model,
            error=str(err)[:2000],
            status=err.status,
            attempt=self.job.attempt,
            retry_in_s=retry_in,
        )
        await self.append(event)
        then = "giving up" if last else f"trying again in {retry_in:.0f}s"
        logger.warning("session %s: model call failed (attempt %d): %s; %s", self.sid, self.job.attempt, err, then)

    async def activity(self, work: Any) -> Any:
        """Run a model call or tool as the one thing an interrupt cancels; raises `Interrupted` then."""
        self._activity = activity = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._look_for_interrupts(activity))
        try:
            return await activity
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._interrupting is None or (current is not None and current.cancelling()):
                raise  # the run itself is being cancelled (shutdown), not interrupted
            self.interrupted_by = self._interrupting.author
            raise Interrupted() from None
        finally:
            watch.cancel()
            self._activity = None
            self._interrupting = None

    async def _look_for_interrupts(self, activity: asyncio.Future[Any]) -> None:
        """While a model call or a tool runs: an interrupt is acted on the moment its live signal
        arrives (`AgentWorker._people`). A signal can be missed (the subscription down or being
        made again, a reconnect, a slow subscriber), and a long command would then run to its end
        with the interrupt unheard: so whenever the run's hearing is not to be trusted, and at least
        every `FALLBACK_S`, it looks in the log itself (one lookup when nothing is new)."""
        known = {r.seq for r in self.records if isinstance(r.event, InterruptRequested)}
        while not activity.done():
            await asyncio.sleep(_INTERRUPT_LOOK_S)
            if activity.done() or not self.transcript.must_look():
                continue
            try:
                await self.transcript.catch_up()
            except Exception as err:  # a look that failed is tried again; the activity goes on
                logger.debug("session %s: looking for an interrupt: %s", self.sid, err)
                continue
            for rec in self.records:
                if isinstance(rec.event, InterruptRequested) and rec.seq not in known and not activity.done():
                    logger.info("session %s: interrupted by %s (read from the log)", self.sid, rec.event.author)
                    self.interrupt(rec.event)
                    return

    # --- plumbing -----------------------------------------------------------------------------------

    async def append(self, event: Event) -> PubAck:
        """Append to the log with the owner's fence; a foreign step in between means another agent
        owns the session now, and this run stops (`FencedError`)."""
        assert self.writer is not None
        try:
            ack = await self.writer.append(event)
        except FencedError:
            foreign = await self.writer.resync()
            if any(
                isinstance(r.event, ModelResponded | ToolCallStarted | SessionClaimed | SessionEnded) for r in foreign
            ):
                raise  # another agent is working on this session: it owns it now
            self.transcript.merge(foreign)  # e.g. a rejection a service recorded: part of the log now
            ack = await self.writer.append(event)
        self.transcript.appended(ack, event)
        return ack

    def _guard(self) -> Stop | None:
        """Budgets first, then no-progress; checked before every model call, from the log alone."""
        return self._guarded().stop(self.state(), time.time())

    def budget(self) -> Budget:
        """The session's budget as the log now sets it (`agentbus.budget.effective_budget`)."""
        return self._guarded().budget()

    def _guarded(self) -> Guards:
        if self._guards is None:
            self._guards = Guards(self.ctx.pool_budget, self.ctx.no_progress_turns)
        self._guards.fold(self.records, self.transcript.epoch)
        return self._guards

    async def _held(self) -> Stop | None:
        """A dollar ceiling over the whole pool (or fleet), set by the supervisor, pauses like a budget."""
        try:
            hold = await self.ctx.holds.hold()
        except AgentBusError as err:
            logger.warning("session %s: cannot read the pool's hold (%s); going on", self.sid, err)
            return None
        if hold is None:
            return None
        return Stop(hold.limit, f"{hold.detail}; raise the ceiling or `agentbus spend --reset POOL`, then resume")

    def state(self) -> SessionState:
        return self.transcript.state()

    def conversation(self) -> Conversation:
        """`build(records)`, built again only when a record it reads came since the last build (a
        claim or a status does not: a step used to rebuild a long log twice)."""
        recs = self.records
        if self._built is not None:
            conv, upto, last = self._built
            # nothing inserted before the end of the last build, and nothing it reads after it
            if len(recs) >= upto and (upto == 0 or recs[upto - 1] is last) and not any(map(affects, recs[upto:])):
                return conv
        conv = build(recs)
        self._built = (conv, len(recs), recs[-1] if recs else None)
        return conv

    async def _budget_pause(self, stop: Stop) -> Outcome:
        """Park the session (status paused); `agentbus resume` raises the limit and queues it again."""
        resumes = sum(1 for r in self.records if isinstance(r.event, ResumeRequested))
        attrs = {"agentbus.budget.limit": stop.limit, "agentbus.budget.detail": stop.detail}
        with tracing.span("budget pause", attributes=attrs):
            event = BudgetExceeded(id=f"paused-{resumes}-{stop.limit}", limit=stop.limit, detail=stop.detail)
            await self.append(event)
        return await self._paused(f"{stop.limit} {stop.detail}")

    async def pause(self, reason: str, detail: str, key: str) -> Outcome:
        """Pause for a reason that is not a budget (an interrupt, an approval's timeout)."""
        await self.append(SessionPaused(id=f"paused-{key}", reason=reason, detail=detail))
        return await self._paused(f"{reason} {detail}")

    async def _paused(self, why: str) -> Outcome:
        state = self.state()
        logger.info("session %s paused: %s (steps %d, $%.4f)", self.sid, why, state.steps, state.cost_usd)
        await self.ctx.queues.settled(self.sid, state.parent_session, status="paused", turn=state.turn)
        return "ended"

    def _model_spec(self, conv: Conversation) -> str | None:
        """The session's own model (submit --model), else the one its route names, else the pool's."""
        if conv.task is not None and conv.task.model:
            return conv.task.model
        routed = [r.event for r in self.records if isinstance(r.event, Routed)]
        return routed[-1].model if routed and routed[-1].model else None

    async def end(self, status: Literal["completed", "failed", "cancelled"], reason: str, result: str = "") -> Outcome:
        await repo_workspace.before_end(self, status, reason)  # issue 19: what a failed run left, committed
        event = SessionEnded(id=ended_id(self.state().turn), status=status, reason=reason, result=result)
        sent = self._unsure_end
        if sent is not None and (sent.id, sent.status, sent.reason, sent.result) == (event.id, status, reason, result):
            event = sent  # sent behind the answer, maybe stored: the same bytes, so found as ours
        await self.append(event)
        return await self._ended(status, reason)

    async def _ended(self, status: Literal["completed", "failed", "cancelled"], reason: str) -> Outcome:
        """After the end is recorded."""
        await repo_workspace.release(self)  # issue 19: the worktree goes, the branch stays
        state = self.state()
        tracing.sessions_ended.add(1, {"status": status, tracing.POOL: self.ctx.pool})
        logger.info(
            "session %s %s%s (steps %d, tool calls %d, $%.4f)",
            self.sid, status, f": {reason}" if reason else "", state.steps, state.tool_calls, state.cost_usd,
        )  # fmt: skip
        await self.ctx.queues.settled(self.sid, state.parent_session, status=status, turn=state.turn)
        return "ended"

    async def _hand_to_evaluator(self, round_: int) -> Outcome:
        """The result goes to the evaluator; the session is not over until it says so."""
        await self.append(
            StatusChanged(
                id=f"evaluating-{round_}-{self.claim}",
                status="evaluating",
                reason=f"round {round_} result handed to the evaluator",
            )
        )
        await self.ctx.queues.enqueue(WorkItem(session_id=self.sid, reason="evaluate", round=round_), "evaluator")
        logger.info("session %s: round %d handed to the evaluator", self.sid, round_)
        return "ended"

    async def refresh(self) -> None:
        """What people wrote since the last look (an answer, a decision), merged in stream order;
        always asked of the stream (it comes before a park, where a missed answer would wait)."""
        await self.transcript.catch_up(force=True)

    def workspace(self, *, create: bool = True) -> Path:
        """The session's folder (absolute: the worker resolved its workdir at start)."""
        if self.ctx.repo is not None:  # issue 19: the session's worktree (made at the claim)
            return self.ctx.repo.path(self.sid)
        path = self.ctx.workdir / self.sid
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path


__all__ = ["WAKE_REASONS", "Outcome", "Parked", "Released", "RunContext", "SessionRun"]
