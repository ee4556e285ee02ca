"""The one place that queues work: which subject a work item goes to, under which message id, in what order.

Every reason to run a session (a submission, a route, a revision, a resume, a hand-back,
an evaluation) becomes a `WorkItem` through `WorkQueues.enqueue`, so the dedup-id rule that
`subjects.md` documents exists once (`msg_id`). Consumers read work items through
`WorkQueues.accept` and settle what their loop cannot handle alone with `WorkSettlement`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Literal, NoReturn

import msgspec

from agentbus.bus import MSG_ID, Job, Outgoing, PubAck
from agentbus.errors import BusError
from agentbus.messages import (
    InputRejected,
    InvalidEvent,
    Record,
    Routed,
    SessionCreated,
    SessionEnded,
    Task,
    Timer,
    WorkItem,
    decode_work,
    encode,
    ended_id,
    event_type,
    session_id_of,
)
from agentbus.service import Reject, Retry, Settled
from agentbus.session import SessionLog
from agentbus.subjects import valid_token

logger = logging.getLogger("agentbus.queues")

Destination = Literal["router", "evaluator"] | str  # a pool name, or one of the two services
_WITHDRAW_SCAN = 10_000
# A work item may land before its session's first record (a writer in another language, a submit
# retried after a failure). It waits for the session as long as a retried submit with the same ids
# could still bring the session while its own copy of the item is swallowed as a duplicate: the
# work streams' dedup window, and a margin. Waiting costs no delivery: after one delayed retry the
# item is queued again under `<its id>:unseen-<since>-<n>` and this copy acked.
UNSEEN_MARGIN_S = 30.0
_UNSEEN = re.compile(r":unseen-(\d+)-(\d+)$")


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

    async def open_session(self, task: Task, *, trace_id: str | None = None, new: bool = False) -> None:
        """Record a new session and queue it: on its pool, or for a router to choose one.

        Safe to repeat with the same task: an existing session is never recorded twice, and is
        queued again only while no agent has claimed it (the ids deduplicate a queued item).
        """
        sid = task.session_id
        created: SessionCreated | None = None
        if not new and await self.log.exists(sid):  # `new`: an id just made, which nothing can hold yet
            if (await self.log.state(sid)).status not in ("pending", "queued"):
                return
        else:  # on the submitter's own channel: the subject says who submitted it
            created = SessionCreated(id="created", task=task, trace_id=trace_id)
        if task.pool is None and created is not None:
            # the router's item goes right behind the creation on this connection, not after its ack
            # (a round trip off every submission); a router it overtakes looks again (`Router._route`)
            item = WorkItem(session_id=sid)
            queued = Outgoing(self.subject("router"), encode(item), msg_id(item, None))
            await self.bus.publish_together([self.log.outgoing(sid, created, channel="control"), queued])
            return
        if created is not None:
            await self.log.append(sid, created, channel="control")
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

    async def settled(self, session_id: str, parent: str | None, *, status: str, turn: int) -> None:
        """A session ended or paused (`status`, in its `turn`): if its parent waits for it, queue the parent.

        Every writer of an end (or pause) calls this after recording it; a repeat of the same
        settling is harmless (the item's id names it), while a later one (an end after a pause, the
        end of a follow-up turn) queues the parent again. The parent's run checks the child itself
        before parking, so an end recorded while the parent was still running is not missed either.
        """
        if parent is None or not valid_token(parent):
            return
        cause = f"{session_id}-{status}-{turn}"
        opinion = session_id.removeprefix(f"{parent[:56]}-o")
        if opinion != session_id and opinion.isdigit():
            # a sibling of a fan-out (the router names them so): the router collects them all
            await self.enqueue(WorkItem(session_id=parent, reason="child_result"), "router", cause=cause)
            return
        state = await self.log.state(parent)
        if not (state.parked and state.waiting_for == "subtask" and state.pool):
            return
        item = WorkItem(session_id=parent, reason="child_result", round=state.round)
        await self.enqueue(item, state.pool, cause=cause)

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
        """The work item a queue message carries; raises `Reject` for bad input. Whether its session
        has any record is for the handler to see in what it reads anyway (`unseen`): no extra request."""
        try:
            item = decode_work(job.data)
        except msgspec.MsgspecError as err:
            raise Reject(f"malformed work item on {job.subject}: {err}") from err
        if not valid_token(item.session_id):
            raise Reject(f"work item names an invalid session id {item.session_id!r}")
        return item

    async def unseen(self, job: Job, item: WorkItem) -> NoReturn:
        """The item's session has no record yet: it waits for it (`Retry`, then queued again and
        `Settled`), for as long as a retried submit could still bring it; after that it is rejected."""
        msg_id = job.headers.get(MSG_ID, "")

        found = _UNSEEN.search(msg_id)
        since, hops = (float(found.group(1)), int(found.group(2))) if found else (job.stored_at, 0)
        waited = time.time() - (since or time.time())
        if waited > self.unseen_hold_s():
            raise Reject(
                f"work item for session {item.session_id}, which still has nothing in the log {waited:.0f}s"
                " after the item was queued (publish the session's records first: subjects.md, Submitting)"
            )
        if job.attempt == 1:
            raise Retry(delay=min(0.5 * 2**hops, 15.0), reason=f"session {item.session_id} not in the log yet")
        base = msg_id[: found.start()] if found else msg_id or f"{item.session_id}:{item.reason}:{item.round}"
        await self.bus.publish(job.subject, job.data, msg_id=f"{base}:unseen-{int(since)}-{hops + 1}")
        logger.info("session %s not in the log yet; its work item waits (%d)", item.session_id, hops + 1)
        raise Settled()

    def unseen_hold_s(self) -> float:
        """How long a work item waits for its session to appear."""
        windows = [s.duplicate_window_s for s in self.ns.streams() if s.name in self._work_streams]
        return max(windows) + UNSEEN_MARGIN_S

    @property
    def _work_streams(self) -> tuple[str, ...]:
        return (self.ns.work_stream, self.ns.submissions_stream, self.ns.evaluations_stream)

    async def refuse_taskless(self, session_id: str, records: Sequence[Record], source: str = "") -> None:
        """A session whose first record is no valid `session_created` can never start (only the first
        record creates a session, and the same id would be deduplicated): end it `failed`, saying why."""
        first = records[0].event if records else None
        if isinstance(first, InvalidEvent):
            why = f"its first record is invalid: {first.reason}"
        else:
            why = f"its first record is {event_type(first) if first else 'missing'}, not session_created"
        state = await self.log.state(session_id)
        if state.terminal:
            return
        logger.warning("session %s cannot start: %s", session_id, why)
        await self.log.append(session_id, InputRejected(id="no-task", reason=f"cannot start: {why}", source=source))
        await self.log.append(
            session_id, SessionEnded(id=ended_id(state.turn), status="failed", reason=f"no task: {why}")
        )


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
                await self.queues.settled(sid, state.parent_session, status="failed", turn=state.turn)
        logger.error("session %s failed: %s", sid or "?", reason)

    async def handed_back(self, job: Job) -> None:
        try:
            item = decode_work(job.data)
        except msgspec.MsgspecError as err:
            raise BusError(f"cannot hand back message {job.seq}: {err}") from err
        resumed = WorkItem(session_id=item.session_id, reason="resume", round=item.round)
        await self.queues.enqueue(resumed, self.to, cause=f"handback-{job.seq}-{job.attempt}")
