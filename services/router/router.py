"""The router: takes submissions off the shared durable, records the decision, queues the task.

Several routers share one durable consumer, so each submission goes to one of them;
and the routed event and the queued work item carry fixed dedup ids, so even a
redelivered submission (a router died after routing, before acking) is routed once.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from agentbus.bus import Bus, Job
from agentbus.messages import InputRejected, Routed, SessionCreated, WorkItem, decode_work, encode
from agentbus.session import SessionLog
from agentbus.subjects import valid_token
from services.router.routes import RouteTable

log = logging.getLogger("agentbus.router")


class Router:
    """`run()` until `shutdown()`; safe to shut down twice."""

    def __init__(self, bus: Bus, table: RouteTable) -> None:
        self.bus = bus
        self.table = table
        self.log = SessionLog(bus)
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()
        self.routed = 0

    async def run(self) -> None:
        await self.bus.provision()
        puller = await self.bus.pull(self.bus.ns.router_consumer())
        log.info("router ready (default pool %s, %d rules)", self.table.default_pool, len(self.table.routes))
        try:
            while not self._draining.is_set():
                for job in await puller.fetch(16, timeout=1.0):
                    await self._handle(job)
        finally:
            await puller.close()
            self._stopped.set()
            log.info("router stopped after routing %d sessions", self.routed)

    async def shutdown(self) -> None:
        self._draining.set()
        await self._stopped.wait()

    async def _handle(self, job: Job) -> None:
        try:
            item = decode_work(job.data)
        except msgspec.MsgspecError as err:
            log.warning("malformed submission on %s: %s", job.subject, err)
            await job.term()
            return
        if not valid_token(item.session_id):
            log.warning("submission names an invalid session id %r", item.session_id)
            await job.term()
            return
        records = await self.log.read(item.session_id, limit=1)
        created = records[0].event if records else None
        if not isinstance(created, SessionCreated):
            if records:
                reason = "submission has no session_created event first in its log"
                await self.log.append(item.session_id, InputRejected(id=f"rejected-{job.seq}", reason=reason))
            log.warning("submission for %s: no session_created; dropped", item.session_id)
            await job.term()
            return
        decision = self.table.choose(created.task)
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
