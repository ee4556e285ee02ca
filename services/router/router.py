"""The router: takes submissions off the shared durable, records the decision, queues the task.

Several routers share one durable consumer, so each submission goes to one of them;
and the routed event and the queued work item carry fixed dedup ids, so even a
redelivered submission (a router died after routing, before acking) is routed once.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from opentelemetry.trace import Span, SpanKind

from agentbus import tracing
from agentbus.bus import Bus, Job
from agentbus.client import Client
from agentbus.messages import (
    TERMINAL,
    DelegationCompleted,
    DelegationRequested,
    OpinionResult,
    OpinionsAggregated,
    Routed,
    SessionCreated,
    SessionEnded,
    StatusChanged,
    Task,
    WorkItem,
    decode_event,
    encode,
    session_id_of,
)
from agentbus.service import Service
from agentbus.session import SessionLog
from agentbus.subjects import session_id_from_subject
from services.router.routes import RouteTable

log = logging.getLogger("agentbus.router")


class Router(Service):
    """`run()` until `shutdown()`; safe to shut down twice."""

    def __init__(self, bus: Bus, table: RouteTable) -> None:
        self.bus = bus
        self.table = table
        self.log = SessionLog(bus)
        self.client = Client(bus)
        super().__init__()
        self.routed = 0

    async def _serve(self) -> None:
        await self.bus.provision()
        puller = await self.bus.pull(self.bus.ns.router_consumer())
        fanin = asyncio.create_task(self._fanin())
        log.info("router ready (default pool %s, %d rules)", self.table.default_pool, len(self.table.routes))
        try:
            while not self._draining.is_set():
                for job in await puller.fetch(16, timeout=1.0):
                    await self._handle(job)
        finally:
            await puller.close()
            await fanin
            log.info("router stopped after routing %d sessions", self.routed)

    async def _handle(self, job: Job) -> None:
        attrs = tracing.messaging_attrs(job.subject, operation="process")
        sid = session_id_of(job.data)
        with tracing.span(
            "route", kind=SpanKind.CONSUMER, parent=job.trace_context, session_id=sid, attributes=attrs
        ) as span:
            await self._route(job, span)

    async def _route(self, job: Job, span: Span) -> None:
        item = await self.log.accept_work(job)
        if item is None:
            return
        records = await self.log.read(item.session_id, limit=1)
        created = records[0].event if records else None
        if not isinstance(created, SessionCreated):
            await self.log.reject(job, "submission has no session_created event first in its log")
            return
        if created.task.opinions:
            await self._fan_out(item.session_id, created.task)
            await job.ack()
            self.routed += 1
            return
        span.set_attribute(tracing.SESSION_ID, item.session_id)
        decision = self.table.choose(created.task)
        span.set_attributes({tracing.POOL: decision.pool, "agentbus.route.rule": decision.rule})
        await self.log.append(
            item.session_id, Routed(id="routed", pool=decision.pool, rule=decision.rule, model=decision.model)
        )
        await self.bus.publish(
            self.bus.ns.work(decision.pool),
            encode(WorkItem(session_id=item.session_id)),
            msg_id=f"{item.session_id}:new",
        )
        await job.ack()
        self.routed += 1
        log.info("%s -> %s (%s)", item.session_id, decision.pool, decision.rule)

    # --- fan-out ------------------------------------------------------------------------------

    async def _fan_out(self, sid: str, task: Task) -> None:
        """One sibling session per opinion; fixed ids, so a redelivered submission starts none twice."""
        for i, child in enumerate(opinion_ids(sid, task)):
            pool = task.opinions[i] or self.table.choose(msgspec.structs.replace(task, opinions=())).pool
            await self.log.append(
                sid, DelegationRequested(id=f"opinion-{i + 1}", child_session=child, pool=pool, prompt=task.prompt)
            )
            await self.client.submit(
                task.prompt,
                pool=pool,
                criteria=task.criteria,
                checks=task.checks,
                max_rounds=task.max_rounds,
                budget=task.budget,
                tags=task.tags,
                submitter=task.submitter,
                parent_session=sid,
                depth=task.depth + 1,
                session_id=child,
            )
        reason = f"waiting for {len(task.opinions)} opinions"
        await self.log.append(sid, StatusChanged(id="fanned-out", status="running", reason=reason))

    async def _fanin(self) -> None:
        """Watch sessions end; when every sibling of a fan-out has, record the aggregate in the parent."""
        puller = await self.bus.pull(self.bus.ns.fanin_consumer())
        try:
            while not self._draining.is_set():
                for job in await puller.fetch(64, timeout=1.0):
                    if isinstance(decode_event(job.data), SessionEnded):
                        sid = session_id_from_subject(job.subject)
                        if sid:
                            await self._child_ended(sid)
                    await job.ack(sync=False)  # a redelivery only repeats deduplicated writes
        finally:
            await puller.close()

    async def _child_ended(self, child: str) -> None:
        first = await self.log.read(child, limit=1)
        if not first or not isinstance(first[0].event, SessionCreated):
            return
        parent = first[0].event.task.parent_session
        if parent is None:
            return
        head = await self.log.read(parent, limit=1)
        if not head or not isinstance(head[0].event, SessionCreated) or not head[0].event.task.opinions:
            return  # an ordinary delegation: the delegating agent collects it
        task = head[0].event.task
        states = [await self.client.state(c) for c in opinion_ids(parent, task)]
        done = next(s for s in states if s.session_id == child)
        await self.log.append(
            parent,
            DelegationCompleted(id=f"delegated-{child}", child_session=child, status=done.status, result=done.result),
        )
        if not all(s.status in TERMINAL for s in states):
            return
        results = tuple(
            OpinionResult(session_id=s.session_id, pool=s.pool or "", status=s.status, result=s.result, reason=s.reason)
            for s in states
        )
        await self.log.append(parent, OpinionsAggregated(id="aggregated", results=results))
        ok = [r for r in results if r.status == "completed"]
        summary = "\n\n".join(f"[{r.session_id} on {r.pool}] {r.result}" for r in ok)
        await self.log.append(
            parent,
            SessionEnded(
                id="ended",
                status="completed" if ok else "failed",
                reason=f"{len(ok)} of {len(results)} opinions completed",
                result=summary,
            ),
        )


def opinion_ids(sid: str, task: Task) -> list[str]:
    return [f"{sid[:56]}-o{i + 1}" for i in range(len(task.opinions))]
