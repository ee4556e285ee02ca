"""What queues a parked session again: a person's input, and wake-ups that come due.

Every agent (of any pool) shares three durables: `wake`, over every session's input channel,
`wake-control`, over the command channels (a cancel there), and `timers`, over wake-ups due later.
A parked session holds no agent slot and no consumer; one of these notices that it can go on and
queues it on its pool. Reading every person's message anyway, the first two also answer what
cannot be used with an `input_rejected` in its session (`agentbus.rejects`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from agentbus import rejects
from agentbus.authority import honoured
from agentbus.bus import Bus, Job
from agentbus.messages import (
    ApprovalDecided,
    CancelRequested,
    HumanMessage,
    InterruptRequested,
    Timer,
    WorkItem,
    decode_event,
)
from agentbus.queues import WorkQueues
from agentbus.service import Consumer, LogOnly, Reject, Retry, consume
from agentbus.subjects import ConsumerSpec, parse_session_subject, valid_token

logger = logging.getLogger("agentbus.agent")

# input that can let a parked session go on
_WAKING = (HumanMessage, ApprovalDecided, CancelRequested, InterruptRequested)
_timer_decoder = msgspec.json.Decoder(Timer)


class WakeWatcher:
    """Queues a parked session when someone answers it, decides its approval, cancels or interrupts it,
    and answers input it cannot use. `spec`: the durable (`wake` by default; `wake-control`)."""

    def __init__(self, bus: Bus, queues: WorkQueues, spec: ConsumerSpec | None = None) -> None:
        self.bus = bus
        self.queues = queues
        self.spec = spec or bus.ns.wake_consumer()

    async def run(self, draining: asyncio.Event) -> None:
        # sync_ack off: a redelivery queues and answers with the same ids, which deduplicate
        consumer = Consumer(
            spec=self.spec, handle=self._handle, settle=LogOnly(self.spec.durable), concurrency=16, sync_ack=False
        )
        await consume(self.bus, consumer, draining)

    async def _handle(self, job: Job) -> None:
        sid, channel, sender = parse_session_subject(job.subject) or ("", "input", "")
        if not valid_token(sid):
            raise Reject(f"input on {job.subject}, which names no valid session")
        event = honoured(channel, sender, decode_event(job.data, job.stored_at))  # the subject says who sent it
        why = rejects.why_unusable(event)
        if why is not None:
            await rejects.answer(self.queues.log, sid, job.seq, job.subject, why)
            return
        if not isinstance(event, _WAKING):
            return
        if await self.queues.wake(sid, job.seq):
            logger.info("session %s woken by input #%d", sid, job.seq)


class TimerWatcher:
    """Holds each wake-up until it is due, then queues its session (if it still waits for it)."""

    def __init__(self, bus: Bus, queues: WorkQueues) -> None:
        self.bus = bus
        self.queues = queues

    async def run(self, draining: asyncio.Event) -> None:
        consumer = Consumer(
            spec=self.bus.ns.timers_consumer(),
            handle=self._handle,
            settle=LogOnly("timers"),
            concurrency=16,
            sync_ack=False,  # a redelivery queues with the same id, which deduplicates
        )
        await consume(self.bus, consumer, draining)

    async def _handle(self, job: Job) -> None:
        try:
            timer = _timer_decoder.decode(job.data)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as err:
            raise Reject(f"unreadable timer: {err}") from err
        if not valid_token(timer.session_id):
            raise Reject(f"timer for an invalid session id {timer.session_id!r}")
        left = timer.due_ts - time.time()
        if left > 0:
            raise Retry(delay=left)  # given back until it is due; its deliveries never run out
        state = await self.queues.log.state(timer.session_id)
        if not state.parked or state.tool_use_id != timer.tool_use_id or not state.pool:
            return  # decided (or moved on) before the timeout: nothing to do
        item = WorkItem(session_id=timer.session_id, reason="timeout", round=state.round)
        await self.queues.enqueue(item, state.pool, cause=f"{timer.tool_use_id}-{int(timer.due_ts)}")
        logger.info("session %s: approval of %s timed out", timer.session_id, timer.tool_use_id)
