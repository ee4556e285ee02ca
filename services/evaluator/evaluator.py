"""The evaluator: grades a round's result, records the verdict, then ends the session or sends it back.

Everything it does for one round carries a fixed dedup id (`verdict-<round>`,
`revision-<round+1>`, `ended`), so an evaluator that dies mid-round and is
replaced by another never records a round twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.bus import Bus, Job
from agentbus.errors import AgentBusError
from agentbus.messages import (
    ModelResponded,
    Record,
    RevisionRequested,
    SessionCreated,
    SessionEnded,
    StatusChanged,
    Task,
    VerdictRecorded,
    WorkItem,
    ended_id,
    text_of,
)
from agentbus.models import ModelClient, ModelError, cost_usd
from agentbus.queues import WorkQueues, WorkSettlement
from agentbus.sandbox import Sandbox, open_sandbox
from agentbus.service import Consumer, Service, consume
from agentbus.session import SessionLog
from agentbus.spend import SpendLedger
from agentbus.state import SessionState, fold_all
from agentbus.subjects import valid_token
from services.evaluator.grading import Graded, GradingError, committed_head, grade_criteria, run_checks
from services.evaluator.policy import PIVOT_AFTER, critique_of, decide, verdict_of

logger = logging.getLogger("agentbus.evaluator")
DEFAULT_WORKDIR = Path(".agentbus/work")  # the agents' default --workdir


class Evaluator(Service):
    """`run()` until `shutdown()`; safe to shut down twice."""

    def __init__(
        self,
        bus: Bus,
        model: ModelClient | None,
        *,
        pivot_after: int = PIVOT_AFTER,
        workdir: Path = DEFAULT_WORKDIR,
        sandbox: Sandbox | None = None,
    ) -> None:
        # Issue 14 (sandbox): checks run in `sandbox`, by default bubblewrap, probed here so a host that
        # cannot run it refuses at start; `workdir` is the agents' workspace root (a session's is workdir/<id>).
        self.sandbox = sandbox or open_sandbox("bwrap", needed_by="the evaluator's checks")
        self.workdir = workdir
        self.bus = bus
        self.model = model
        self.log = SessionLog(bus)
        self.queues = WorkQueues(self.log)
        self.ledger = SpendLedger(bus)
        self.pivot_after = pivot_after
        super().__init__()
        self.graded = 0

    async def _serve(self) -> None:
        await self.bus.provision()
        consumer = Consumer(
            spec=self.bus.ns.evaluator_consumer(),
            handle=self._handle,
            settle=WorkSettlement(self.queues, "evaluator"),
            keep_alive=True,  # checks and the grader call can outlast the ack wait
        )
        logger.info("evaluator ready (grader %s)", self.model.name if self.model else "none: checks only")
        try:
            await self._supervise(loops=[consume(self.bus, consumer, self._draining)])
        finally:
            logger.info("evaluator stopped after %d rounds", self.graded)

    async def _handle(self, job: Job) -> None:
        item = await self.queues.accept(job)
        if not await self.log.exists(item.session_id):
            await self.queues.unseen(job, item)  # a result queued before its session shows: it waits
        attrs = {**tracing.messaging_attrs(job.subject, operation="process"), "agentbus.round": item.round}
        with tracing.span(
            "evaluate", kind=SpanKind.CONSUMER, parent=job.trace_context, session_id=item.session_id, attributes=attrs
        ):
            await self.evaluate(item.session_id, item.round)
        self.graded += 1

    async def evaluate(self, sid: str, round_: int) -> None:
        records = await self.log.read(sid)
        created = next((r.event for r in records if isinstance(r.event, SessionCreated)), None)
        state = fold_all(SessionState(session_id=sid), records)
        if created is None:
            return
        task = created.task
        if state.terminal:
            await self.queues.settled(
                sid, task.parent_session, status=state.status, turn=state.turn
            )  # a crash lost it?
            return
        # a follow-up opens a new turn of a completed session: its rounds are counted afresh
        verdicts = [
            r.event for r in records if isinstance(r.event, VerdictRecorded) and r.event.round >= state.turn_round
        ]
        current = next((v for v in verdicts if v.round == round_), None)
        if current is None:
            current = await self._grade(sid, round_, records)
            await self.log.append(sid, current)
            verdicts.append(current)
            await self._count_spend(task, current)
        nxt = decide(task, verdicts, pivot_after=self.pivot_after, first_round=state.turn_round)
        trace.get_current_span().set_attributes(
            {"agentbus.verdict": current.verdict, "agentbus.next": nxt.action, tracing.POOL: task.pool or ""}
        )
        output = final_output(records)
        logger.info("%s round %d: %s -> %s", sid, round_, current.verdict, nxt.action)
        if nxt.action == "complete":
            await self._end(state, "completed", "satisfied", output)
        elif nxt.action == "fail":
            await self._end(state, "failed", nxt.reason, output)
        else:
            await self._revise(sid, round_, nxt.critique, nxt.fresh_start, records)

    async def _end(self, state: SessionState, status: Literal["completed", "failed"], reason: str, result: str) -> None:
        end = SessionEnded(id=ended_id(state.turn), status=status, reason=reason, result=result)
        await self.log.append(state.session_id, end)
        tracing.sessions_ended.add(1, {"status": status})
        await self.queues.settled(state.session_id, state.parent_session, status=status, turn=state.turn)

    async def _count_spend(self, task: Task, verdict: VerdictRecorded) -> None:
        """The grader's call is part of what the session and its pool cost."""
        if verdict.cost_usd > 0 and task.pool:
            try:
                await self.ledger.add(task.pool, verdict.cost_usd)
            except AgentBusError as err:
                logger.warning("session %s: pool spend not updated: %s", task.session_id, err)

    async def _revise(self, sid: str, round_: int, critique: str, fresh: bool, records: list[Record]) -> None:
        """Send the work back to the pool the session runs on (from the folded state: a delegation
        to another pool names that pool in its own events, which must not redirect the revision)."""
        state = fold_all(SessionState(session_id=sid), records)
        pool = state.pool
        if pool is None or not valid_token(pool):
            reason = f"needs revision, but the session has no pool to send it back to ({pool!r})"
            await self._end(state, "failed", reason, "")
            return
        revision = RevisionRequested(
            id=f"revision-{round_ + 1}", round=round_ + 1, critique=critique, fresh_start=fresh
        )
        await self.log.append(sid, revision)
        await self.queues.enqueue(WorkItem(session_id=sid, reason="revision", round=round_ + 1), pool)

    async def _grade(self, sid: str, round_: int, records: list[Record]) -> VerdictRecorded:
        task = next(r.event.task for r in records if isinstance(r.event, SessionCreated))
        await self.log.append(
            sid, StatusChanged(id=f"grading-{round_}", status="evaluating", reason=f"grading round {round_}")
        )
        output = final_output(records)
        with tracing.span("run checks", session_id=sid, attributes={"agentbus.checks": len(task.checks)}):
            checks = await run_checks(  # never a path from the log; issue 19: a repository's session, on its commit
                task.checks, self.workdir, sid, self.sandbox, committed=committed_head(records)
            )
        try:
            if task.criteria and self.model is None:
                raise GradingError("the session has criteria but this evaluator has no grader model (--model)")
            graded = (
                await grade_criteria(self.model, task, output, session_id=f"{sid}-grade-{round_}")
                if self.model and task.criteria
                else Graded()
            )
        except (GradingError, ModelError) as err:
            return VerdictRecorded(
                id=f"verdict-{round_}", round=round_, verdict="failed", checks=checks, critique=str(err)
            )
        verdict = verdict_of(graded.criteria, checks)
        critique = critique_of(graded.criteria, checks) if verdict != "satisfied" else ""
        return VerdictRecorded(
            id=f"verdict-{round_}",
            round=round_,
            verdict=verdict,  # type: ignore[arg-type]
            criteria=graded.criteria,
            checks=checks,
            critique=critique,
            grader_model=graded.model,
            usage=graded.usage,
            cost_usd=cost_usd(graded.model, graded.usage) if graded.model else 0.0,
        )


def final_output(records: list[Record]) -> str:
    """The text of the model's last reply: the result, without the reasoning that led there."""
    for rec in reversed(records):
        if isinstance(rec.event, ModelResponded):
            return text_of(rec.event.content)
    return ""
