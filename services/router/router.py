"""The router: takes submissions off the shared durable, records the decision, queues the task.

Several routers share one durable consumer, so each submission goes to one of them;
and the routed event and the queued work item carry fixed dedup ids, so even a
redelivered submission (a router died after routing, before acking) is routed once.
Routing is concurrent: decisions are independent and idempotent.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from agentbus import openings, tracing
from agentbus.bus import Bus, Delivery, Job
from agentbus.errors import FencedError
from agentbus.messages import (
    DelegationRequested,
    InputRejected,
    Opening,
    Routed,
    SessionCreated,
    SessionEnded,
    StatusChanged,
    Task,
    WorkItem,
    encode,
    session_id_of,
)
from agentbus.queues import WorkQueues, WorkSettlement
from agentbus.service import Consumer, Service, consume
from agentbus.session import SessionLog, record_of
from agentbus.subjects import valid_token
from services.router.fanin import FanIn, opinion_ids
from services.router.routes import RouteTable

KEEP_S = 30.0  # how often the router brings the state cache up to date and sweeps fan-outs (a fallback:
# fan-outs are collected on their siblings' child_result items, listings fold what is behind)
_OVERTAKEN_S = (0.002, 0.01, 0.05)  # looks again after these pauses before the item waits its turn
logger = logging.getLogger("agentbus.router")

ROUTING_CONCURRENCY = 16


class Router(Service):
    """`run()` until `shutdown()`; safe to shut down twice."""

    def __init__(self, bus: Bus, table: RouteTable) -> None:
        self.bus = bus
        self.table = table
        self.log = SessionLog(bus)
        self.queues = WorkQueues(self.log)
        self.fanin = FanIn(self.log)
        self.key = openings.WorkKey(bus, make=True)
        super().__init__()
        self.routed = 0

    async def _serve(self) -> None:
        await self.bus.provision()
        await self.key.get()  # made now if this is the first router: not on the first session's path
        submissions = Consumer(
            spec=self.bus.ns.router_consumer(),
            handle=self._handle,
            settle=WorkSettlement(self.queues, "router"),
            concurrency=ROUTING_CONCURRENCY,
            # a redelivery (an ack lost with the connection) routes again to the same records and
            # item, which their ids deduplicate (the ack wait is inside the streams' window)
            sync_ack=False,
        )
        logger.info("router ready (default pool %s, %d rules)", self.table.default_pool, len(self.table.routes))
        try:
            await self._supervise(loops=[consume(self.bus, submissions, self._draining)], daemons=[self._keep()])
        finally:
            logger.info("router stopped after routing %d sessions", self.routed)

    async def _keep(self) -> None:
        """Every KEEP_S, when the session stream moved: bring the state cache of every session up to date (a service may
        write it; people's listings then read one batch instead of folding each session), and
        collect any fan-out whose siblings have all ended but whose parent was never told (a
        notice lost to a crash, or sent by no one: an end written before this version)."""
        swept_to = -1
        while True:
            try:
                # one stream-info request when nothing was written since: an idle fleet costs nothing
                last = await self.bus.stream_last_seq(self.bus.ns.sessions_stream)
                if last != swept_to:
                    await self.fanin.sweep(await self.log.states())
                    swept_to = last
            except Exception as err:
                logger.warning("keeping the state cache: %s; trying again", err)
            await asyncio.sleep(KEEP_S)

    async def _handle(self, job: Job) -> None:
        attrs = tracing.messaging_attrs(job.subject, operation="process")
        sid = session_id_of(job.data)
        with tracing.span("route", kind=SpanKind.CONSUMER, parent=job.trace_context, session_id=sid, attributes=attrs):
            await self._route(job)

    async def _route(self, job: Job) -> None:
        item = await self.queues.accept(job)
        sid = item.session_id
        first = await self.log.first(sid)
        for pause in _OVERTAKEN_S if first is None and job.attempt == 1 else ():
            # a client sends its item right behind the creation, to another stream: the item may
            # be stored a moment before it
            await asyncio.sleep(pause)
            if (first := await self.log.first(sid)) is not None:
                break
        if first is None:
            await self.queues.unseen(job, item)  # the item overtook its session: it waits
        records = [record_of(first)] if first is not None else []
        created = records[0].event if records else None
        if not isinstance(created, SessionCreated):  # it can never start: end it, saying why
            await self.queues.refuse_taskless(sid, records, job.subject)
            return
        if item.reason == "child_result":  # a fan-out's sibling ended or paused
            if created.task.opinions:
                await self.fanin.collect(sid, created.task)
            else:  # nothing the router collects (delegations go to the parent's pool): not a route
                logger.warning("session %s: a child_result for a session that is no fan-out; dropped", sid)
            return
        if created.task.opinions:
            await self._fan_out(sid, created.task)
            self.routed += 1
            return
        decision = self.table.choose(created.task)
        if not valid_token(decision.pool):
            await self._refuse(sid, f"the task names pool {decision.pool!r}, which is not a valid pool name")
            return
        trace.get_current_span().set_attributes(
            {tracing.SESSION_ID: sid, tracing.POOL: decision.pool, "agentbus.route.rule": decision.rule}
        )
        routed = Routed(id="routed", pool=decision.pool, rule=decision.rule, model=decision.model)
        opening = await self._record_route(sid, first, routed)
        await self.queues.enqueue(WorkItem(session_id=sid, opening=opening), decision.pool)
        self.routed += 1
        logger.info("%s -> %s (%s)", sid, decision.pool, decision.rule)

    async def _record_route(self, sid: str, created: Delivery, routed: Routed) -> Opening | None:
        """Record the route; right after the creation (fenced on the whole session), also the signed
        opening the work item carries, so the agent need not read the session (`agentbus.openings`)."""
        data = encode(routed)
        if not self.bus.fences_on_wildcards:
            await self.log.append(sid, routed, encoded=data)
            return None
        try:
            ack = await self.log.append(sid, routed, encoded=data, expect_last_seq=created.seq, whole_session=True)
        except FencedError:  # written to since its creation (a person; this route, redelivered): the agent reads
            await self.log.append(sid, routed, encoded=data)
            return None
        if ack.duplicate:
            return None
        return await openings.sign(self.key, sid, created, routed, data, ack.seq)

    async def _refuse(self, sid: str, reason: str) -> None:
        """A session that can never be routed ends `failed` with the reason, instead of waiting forever."""
        logger.warning("session %s not routed: %s", sid, reason)
        await self.log.append(sid, InputRejected(id="route-rejected", reason=reason, source=self.bus.ns.submissions()))
        await self.log.append(sid, SessionEnded(id="ended", status="failed", reason=f"not routed: {reason}"))

    async def _fan_out(self, sid: str, task: Task) -> None:
        """One sibling session per opinion; fixed ids, so a redelivered submission starts none twice."""
        pools = [p or self.table.choose(msgspec.structs.replace(task, opinions=())).pool for p in task.opinions]
        bad = [p for p in pools if not valid_token(p)]
        if bad:
            await self._refuse(sid, f"the fan-out names pool {bad[0]!r}, which is not a valid pool name")
            return
        for i, (child, pool) in enumerate(zip(opinion_ids(sid, task), pools, strict=True)):
            await self.log.append(
                sid, DelegationRequested(id=f"opinion-{i + 1}", child_session=child, pool=pool, prompt=task.prompt)
            )
            sibling = msgspec.structs.replace(
                task, session_id=child, pool=pool, parent_session=sid, depth=task.depth + 1, opinions=()
            )
            await self.queues.open_session(sibling, trace_id=tracing.current_trace_id())
        reason = f"waiting for {len(task.opinions)} opinions"
        await self.log.append(sid, StatusChanged(id="fanned-out", status="running", reason=reason))
