"""The one place that queues work: which subject a work item goes to, under which message id, in what order.

Every reason to run a session (a submission, a route, a revision, a resume, a hand-back,
an evaluation) becomes a `WorkItem` through `WorkQueues.enqueue`, so the dedup-id rule that
`subjects.md` documents exists once (`msg_id`). Consumers read work items through
`WorkQueues.accept` and settle what their loop cannot handle alone with `WorkSettlement`.
"""

from __future__ import annotations

import logging
from typing import Literal

import msgspec

from agentbus.bus import Job, PubAck
from agentbus.errors import BusError
from agentbus.messages import (
    InputRejected,
    Routed,
    SessionCreated,
    SessionEnded,
    Task,
    Timer,
    WorkItem,
    decode_work,
    encode,
    ended_id,
    session_id_of,
)
from agentbus.service import Reject, Retry
from agentbus.session import SessionLog
from agentbus.subjects import valid_token

logger = logging.getLogger("agentbus.queues")

Destination = Literal["router", "evaluator"] | str  # a pool name, or one of the two services
_NOT_YET_VISIBLE_RETRIES = 3  # a work item may overtake its session's first event by a moment
_WITHDRAW_SCAN = 10_000


def msg_id(item: WorkItem, cause: str | None = None) -> str:
    """`<session>:<reason>:<round>`, plus `:<cause>` where one round may be queued again for a new
    reason (a resume names the sequence of its request; a hand-back the message it replaces).

    The id is what makes queueing idempotent: a retried enqueue of the same item is stored once.
    """
    base = f"{item.session_id}:{item.reason}:{item.round}"
    return f"{base}:{cause}" if cause else base


class WorkQueues:
    """Queues work items and opens sessions, on one session log's bus."""

    def __init__(self, log: SessionLog) -> None:
        self.log = log
        self.bus = log.bus
        self.ns = log.bus.ns

    def subject(self, to: Destination) -> str:
        if to == "router":
            return self.ns.submissions()
        if to == "evaluator":
            return self.ns.evaluations()
        return self.ns.work(to)

    async def enqueue(self, item: WorkItem, to: Destination, *, cause: str | None = None) -> PubAck:
        """Store one work item for a pool (by name), the router or the evaluator."""
        return await self.bus.publish(self.subject(to), encode(item), msg_id=msg_id(item, cause))

    async def open_session(self, task: Task, *, trace_id: str | None = None) -> None:
        """Record a new session and queue it: on its pool, or for a router to choose one.

        Safe to repeat with the same task: an existing session is never recorded twice, and is
        queued again only while no agent has claimed it (the ids deduplicate a queued item).
        """
        sid = task.session_id
        if await self.log.exists(sid):
            if (await self.log.state(sid)).status not in ("pending", "queued"):
                return
        else:  # on the submitter's own channel: the subject says who submitted it
            await self.log.append(sid, SessionCreated(id="created", task=task, trace_id=trace_id), channel="control")
        if task.pool is None:
            await self.enqueue(WorkItem(session_id=sid), "router")
            return
        await self.log.append(sid, Routed(id="routed", pool=task.pool, rule="explicit"), channel="control")
        await self.enqueue(WorkItem(session_id=sid), task.pool)

    async def schedule(self, timer: Timer, *, cause: str) -> PubAck:
        """Queue a wake-up for later (agents hold it until `due_ts`, then queue the session)."""
        return await self.bus.publish(
            self.ns.timers(), encode(timer), msg_id=f"{timer.session_id}:timer:{timer.round}:{cause}"
        )

    async def settled(self, session_id: str, parent: str | None) -> None:
        """A session ended or paused: if its parent is parked waiting for it, queue the parent.

        Every writer of an end (or pause) calls this after recording it; a repeat is harmless
        (the item's id is fixed), and the parent's run checks the child itself before parking,
        so an end recorded while the parent was still running is not missed either.
        """
        if parent is None or not valid_token(parent):
            return
        state = await self.log.state(parent)
        if not (state.parked and state.waiting_for == "subtask" and state.pool):
            return
        item = WorkItem(session_id=parent, reason="child_result", round=state.round)
        await self.enqueue(item, state.pool, cause=session_id)

    async def wake(self, session_id: str, seq: int) -> bool:
        """Queue a parked session again because of the input at `seq` (an answer, an approval, a cancel,
        an interrupt); False when it is not parked, or parked after that input (its run saw it)."""
        state = await self.log.state(session_id)
        if not state.parked or seq <= state.parked_at or not state.pool or not valid_token(state.pool):
            return False
        cause = str(seq)
        await self.enqueue(WorkItem(session_id=session_id, reason="wake", round=state.round), state.pool, cause=cause)
        return True

    async def withdraw(self, session_id: str, pool: str) -> int:
        """Delete the session's items still waiting on `pool`'s queue; returns how many.

        Work queues are short; this walks the pool's stored items by subject (direct gets,
        no consumer, which a work-queue stream would refuse next to the pool's own).
        """
        stream, subject = self.ns.work_stream, self.ns.work(pool)
        removed, seq = 0, 1
        for _ in range(_WITHDRAW_SCAN):
            found = await self.bus.next_stored(stream, subject, seq)
            if found is None:
                break
            seq = found.seq
            if session_id_of(found.data) == session_id:
                await self.bus.delete_stored(stream, seq)
                removed += 1
            seq += 1
        return removed

    async def accept(self, job: Job) -> WorkItem:
        """The work item a queue message carries; raises `Reject` for bad input, `Retry` for an item
        that overtook its session's first event (it arrives a moment later)."""
        try:
            item = decode_work(job.data)
        except msgspec.MsgspecError as err:
            raise Reject(f"malformed work item on {job.subject}: {err}") from err
        if not valid_token(item.session_id):
            raise Reject(f"work item names an invalid session id {item.session_id!r}")
        if not await self.log.exists(item.session_id):
            if job.attempt < _NOT_YET_VISIBLE_RETRIES:
                raise Retry(delay=0.5, reason=f"session {item.session_id} not in the log yet")
            raise Reject(f"work item for session {item.session_id}, which has nothing in the log")
        return item


class WorkSettlement:
    """What the consume loop records for a work item it cannot handle: in the session the item names.

    Args:
        queues: where hand-backs are queued.
        to: the destination a handed-back item goes to again (a pool, the router or the evaluator).
    """

    def __init__(self, queues: WorkQueues, to: Destination) -> None:
        self.queues = queues
        self.log = queues.log
        self.to = to

    async def rejected(self, job: Job, reason: str) -> None:
        logger.warning("%s", reason)
        sid = session_id_of(job.data)
        if sid and await self.log.exists(sid):
            await self.log.append(sid, InputRejected(id=f"rejected-{job.seq}", reason=reason, source=job.subject))

    async def gave_up(self, job: Job, reason: str) -> None:
        sid = session_id_of(job.data)
        if sid and await self.log.exists(sid):
            state = await self.log.state(sid)
            if not state.terminal:
                await self.log.append(sid, SessionEnded(id=ended_id(state.turn), status="failed", reason=reason))
                await self.queues.settled(sid, state.parent_session)
        logger.error("session %s failed: %s", sid or "?", reason)

    async def handed_back(self, job: Job) -> None:
        try:
            item = decode_work(job.data)
        except msgspec.MsgspecError as err:
            raise BusError(f"cannot hand back message {job.seq}: {err}") from err
        resumed = WorkItem(session_id=item.session_id, reason="resume", round=item.round)
        await self.queues.enqueue(resumed, self.to, cause=f"handback-{job.seq}-{job.attempt}")
