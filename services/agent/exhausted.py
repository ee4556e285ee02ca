"""Tasks whose deliveries ran out while their agents kept dying: fail their sessions so nobody waits forever.

JetStream has no dead-letter queue; it announces an exhausted task with an advisory on a core
subject. Those advisories are kept in a stream (see subjects.md), so one sent while no agent
of the pool ran is handled by the next agent to start. Where that stream could not be made,
the agent listens to the announcements live instead.
"""

from __future__ import annotations

import asyncio
import json
import logging

from agentbus.bus import Bus, Job
from agentbus.errors import AgentBusError
from agentbus.messages import SessionEnded, ended_id, session_id_of
from agentbus.queues import WorkQueues
from agentbus.service import Consumer, LogOnly, Reject, consume

logger = logging.getLogger("agentbus.agent")


class ExhaustedWatcher:
    """Fails the session of each exhausted task of one pool, once, whichever agent of the pool reads it."""

    def __init__(self, bus: Bus, queues: WorkQueues, pool: str, max_deliver: int) -> None:
        self.bus = bus
        self.queues = queues
        self.log = queues.log
        self.pool = pool
        self.max_deliver = max_deliver

    async def run(self, draining: asyncio.Event) -> None:
        """Until `draining` is set: the stored advisories, else (no such stream) the live ones."""
        consumer = Consumer(
            spec=self.bus.ns.exhausted_consumer(self.pool), handle=self._handle, settle=LogOnly("exhausted tasks")
        )
        while not draining.is_set():
            try:
                await consume(self.bus, consumer, draining)
                return
            except AgentBusError as err:
                if not await self._stream_exists_or_unknown():
                    logger.warning("no %s stream; listening for advisories live instead", self.bus.ns.exhausted_stream)
                    await self._listen(draining)
                    return
                logger.warning("cannot read stored advisories yet (%s); trying again", err)
                await asyncio.sleep(1.0)

    async def _handle(self, job: Job) -> None:
        await self.record(_stream_seq(job.data))

    async def _stream_exists_or_unknown(self) -> bool:
        try:
            return await self.bus.stream_exists(self.bus.ns.exhausted_stream)
        except AgentBusError:
            return True  # can't tell now: keep trying the durable way

    async def _listen(self, draining: asyncio.Event) -> None:
        async def listen() -> None:
            async for advisory in self.bus.announcements(self.bus.ns.exhausted(self.pool)):
                try:
                    await self.record(_stream_seq(advisory))
                except (Reject, AgentBusError) as err:
                    logger.warning("exhausted task not recorded: %s", err)

        listener = asyncio.create_task(listen())
        await draining.wait()
        listener.cancel()

    async def record(self, seq: int) -> None:
        """End the session of the task at `seq` of the work stream `failed`, then delete the task."""
        stream = self.bus.ns.work_stream
        data = await self.bus.get_stored(stream, seq)
        if data is None:
            return  # already handled: the task is gone from the queue
        sid = session_id_of(data)
        if sid and await self.log.exists(sid):
            state = await self.log.state(sid)
            if not state.terminal:
                reason = f"gave up: delivered {self.max_deliver} times and never finished (max_deliver)"
                await self.log.append(sid, SessionEnded(id=ended_id(state.turn), status="failed", reason=reason))
                await self.queues.settled(sid, state.parent_session, status="failed", turn=state.turn)
                logger.warning("session %s failed: its task was delivered %d times unfinished", sid, self.max_deliver)
        await self.bus.delete_stored(stream, seq)


def _stream_seq(advisory: bytes) -> int:
    """The work-stream sequence an advisory names; `Reject` for anything unreadable."""
    try:
        seq = json.loads(advisory)["stream_seq"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise Reject(f"unreadable max-deliveries advisory: {advisory[:200]!r}") from err
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Reject(f"max-deliveries advisory names no stream sequence: {advisory[:200]!r}")
    return seq
