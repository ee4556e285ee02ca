"""The evaluator: grades a round's result, records the verdict, then ends the session or sends it back.

Everything it does for one round carries a fixed dedup id (`verdict-<round>`,
`revision-<round+1>`, `ended`), so an evaluator that dies mid-round and is
replaced by another never records a round twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.bus import Bus, Job
from agentbus.messages import (
    ModelResponded,
    Record,
    RevisionRequested,
    SessionCreated,
    SessionEnded,
    StatusChanged,
    VerdictRecorded,
    WorkItem,
    encode,
)
from agentbus.models import ModelClient, ModelError
from agentbus.sandbox import Sandbox, open_sandbox
from agentbus.service import Service
from agentbus.session import SessionLog
from services.evaluator.grading import GradingError, grade_criteria, run_checks
from services.evaluator.policy import PIVOT_AFTER, critique_of, decide, verdict_of

log = logging.getLogger("agentbus.evaluator")
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
        self.pivot_after = pivot_after
        super().__init__()
        self.graded = 0

    async def _serve(self) -> None:
        await self.bus.provision()
        puller = await self.bus.pull(self.bus.ns.evaluator_consumer())
        log.info("evaluator ready (grader %s)", self.model.name if self.model else "none: checks only")
        try:
            while not self._draining.is_set():
                for job in await puller.fetch(1, timeout=1.0):
                    await self._handle(job)
        finally:
            await puller.close()
            log.info("evaluator stopped after %d rounds", self.graded)

    async def _handle(self, job: Job) -> None:
        item = await self.log.accept_work(job)
        if item is None:
            return
        attrs = {**tracing.messaging_attrs(job.subject, operation="process"), "agentbus.round": item.round}
        with tracing.span(
            "evaluate", kind=SpanKind.CONSUMER, parent=job.trace_context, session_id=item.session_id, attributes=attrs
        ):
            async with job.kept_alive(20.0):
                await self.evaluate(item.session_id, item.round)
        await job.ack()
        self.graded += 1

    async def evaluate(self, sid: str, round_: int) -> None:
        records = await self.log.read(sid)
        created = next((r.event for r in records if isinstance(r.event, SessionCreated)), None)
        if created is None or any(isinstance(r.event, SessionEnded) for r in records):
            return
        task = created.task
        verdicts = [r.event for r in records if isinstance(r.event, VerdictRecorded)]
        current = next((v for v in verdicts if v.round == round_), None)
        if current is None:
            current = await self._grade(sid, round_, records)
            await self.log.append(sid, current)
            verdicts.append(current)
        nxt = decide(task, verdicts, pivot_after=self.pivot_after)
        trace.get_current_span().set_attributes(
            {"agentbus.verdict": current.verdict, "agentbus.next": nxt.action, tracing.POOL: task.pool or ""}
        )
        output = final_output(records)
        log.info("%s round %d: %s -> %s", sid, round_, current.verdict, nxt.action)
        if nxt.action == "complete":
            await self.log.append(sid, SessionEnded(id="ended", status="completed", reason="satisfied", result=output))
            tracing.sessions_ended.add(1, {"status": "completed"})
        elif nxt.action == "fail":
            await self.log.append(sid, SessionEnded(id="ended", status="failed", reason=nxt.reason, result=output))
            tracing.sessions_ended.add(1, {"status": "failed"})
        else:
            await self.log.append(
                sid,
                RevisionRequested(
                    id=f"revision-{round_ + 1}", round=round_ + 1, critique=nxt.critique, fresh_start=nxt.fresh_start
                ),
            )
            pool = next((r.event.pool for r in reversed(records) if hasattr(r.event, "pool") and r.event.pool), None)
            pool = pool or task.pool
            assert pool is not None, "a session that produced a result was routed to a pool"
            item = WorkItem(session_id=sid, reason="revision", round=round_ + 1)
            await self.bus.publish(self.bus.ns.work(pool), encode(item), msg_id=f"{sid}:revision:{round_ + 1}")

    async def _grade(self, sid: str, round_: int, records: list[Record]) -> VerdictRecorded:
        task = next(r.event.task for r in records if isinstance(r.event, SessionCreated))
        await self.log.append(sid, StatusChanged(id=f"grading-{round_}", status="evaluating", reason=f"round {round_}"))
        output = final_output(records)
        with tracing.span("run checks", session_id=sid, attributes={"agentbus.checks": len(task.checks)}):
            checks = await run_checks(task.checks, self.workdir, sid, self.sandbox)  # never a path from the log
        try:
            if task.criteria and self.model is None:
                raise GradingError("the session has criteria but this evaluator has no grader model (--model)")
            criteria = (
                await grade_criteria(self.model, task, output, session_id=f"{sid}-grade-{round_}")
                if self.model and task.criteria
                else ()
            )
        except (GradingError, ModelError) as err:
            return VerdictRecorded(
                id=f"verdict-{round_}", round=round_, verdict="failed", checks=checks, critique=str(err)
            )
        verdict = verdict_of(criteria, checks)
        critique = critique_of(criteria, checks) if verdict != "satisfied" else ""
        return VerdictRecorded(
            id=f"verdict-{round_}",
            round=round_,
            verdict=verdict,  # type: ignore[arg-type]
            criteria=criteria,
            checks=checks,
            critique=critique,
        )


def final_output(records: list[Record]) -> str:
    """The text of the model's last reply: the result, without the reasoning that led there."""
    for rec in reversed(records):
        if isinstance(rec.event, ModelResponded):
            return "".join(str(b.get("text", "")) for b in rec.event.content if b.get("type") == "text").strip()
    return ""
