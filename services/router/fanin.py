"""Fan-in: when every sibling of a fan-out has ended, record their results side by side in the parent.

A durable position in the log (consumer `router-fanin`), so a fan-out whose last sibling ended
while no router ran is still aggregated when one starts.
"""

from __future__ import annotations

import asyncio
import logging

from agentbus import rejects
from agentbus.bus import Bus, Job
from agentbus.messages import (
    TERMINAL,
    DelegationCompleted,
    OpinionResult,
    OpinionsAggregated,
    SessionCreated,
    SessionEnded,
    Task,
    decode_event,
)
from agentbus.service import Consumer, LogOnly, Reject, consume
from agentbus.session import SessionLog
from agentbus.subjects import session_id_from_subject, valid_token

logger = logging.getLogger("agentbus.router")


def opinion_ids(sid: str, task: Task) -> list[str]:
    """The sibling sessions of a fan-out, in the order the opinions were asked for."""
    return [f"{sid[:56]}-o{i + 1}" for i in range(len(task.opinions))]


class FanIn:
    """Watches sessions end and aggregates fan-outs whose siblings are all done."""

    def __init__(self, bus: Bus, log: SessionLog) -> None:
        self.bus = bus
        self.log = log

    async def run(self, draining: asyncio.Event) -> None:
        consumer = Consumer(
            spec=self.bus.ns.fanin_consumer(),
            handle=self._handle,
            settle=LogOnly("fan-in"),
            sync_ack=False,  # a redelivery only repeats deduplicated writes
        )
        await consume(self.bus, consumer, draining)

    async def _handle(self, job: Job) -> None:
        event = decode_event(job.data, job.stored_at)
        why = rejects.why_unusable(event)  # reading every owner event anyway: answer what cannot be used
        if not isinstance(event, SessionEnded) and why is None:
            return
        sid = session_id_from_subject(job.subject)
        if sid is None or not valid_token(sid):
            raise Reject(f"{job.subject} names no valid session")
        if why is not None:
            await rejects.answer(self.log, sid, job.seq, job.subject, why)
            return
        await self.child_ended(sid)

    async def child_ended(self, child: str) -> None:
        first = await self.log.read(child, limit=1)
        if not first or not isinstance(first[0].event, SessionCreated):
            return
        parent = first[0].event.task.parent_session
        if parent is None or not valid_token(parent):
            return
        head = await self.log.read(parent, limit=1)
        if not head or not isinstance(head[0].event, SessionCreated) or not head[0].event.task.opinions:
            return  # an ordinary delegation: the delegating agent collects it
        task = head[0].event.task
        siblings = opinion_ids(parent, task)
        if child not in siblings:
            return
        states = [await self.log.state(c) for c in siblings]
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
        logger.info("fan-out %s: %d of %d opinions completed", parent, len(ok), len(results))
