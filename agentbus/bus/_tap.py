"""Taps: one scoped push consumer per reader, replaying and then following, with ordered-consumer
semantics kept by hand (a gap or a silence recreates it from the next stream sequence)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Any

from nats import nuid
from nats.aio.msg import Msg
from nats.js import api

from agentbus.bus._core import logger
from agentbus.bus._types import Delivery

if TYPE_CHECKING:
    from agentbus.bus._read import Reading

_REPLAY_BUFFER = 65536  # messages a tap holds for its reader; flow control keeps it far below
_REPLAY_BYTES = 64 << 20  # and payload bytes: 65,536 messages of 8 MiB would be half a terabyte
_HEARTBEAT_S = 2.0  # the server's idle heartbeat on a tap
_STALL_S = 3 * _HEARTBEAT_S  # silence this long means the consumer is gone (its server died, it was removed)
_INACTIVE_S = 2.0  # a consumer nobody listens to this long is removed by the server


def _ack_reply_fields(msg: Msg) -> tuple[int, int, int, int]:
    """Stream sequence, consumer sequence, pending and timestamp (ns) straight from the ack subject."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>
        return int(tokens[5]), int(tokens[6]), int(tokens[8]), int(tokens[7])
    meta = msg.metadata
    ts = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0
    return meta.sequence.stream, meta.sequence.consumer, meta.num_pending, ts


class Tap:
    """One scoped push consumer feeding a `Feed`, recreated after a gap or a stall.

    Flow control is answered only when the reader takes the request off the queue, so a slow
    reader slows the server instead of filling memory.
    """

    def __init__(self, bus: Reading, stream: str, filter_subject: str) -> None:
        self.bus = bus
        self.stream = stream
        self.filter = filter_subject
        self.queue = Feed()
        self._closing: asyncio.Future[Any] | None = None
        self.sub: Any = None
        self.consumer = ""
        self.next_seq = 1  # the stream sequence to restart from
        self.last_cseq = 0
        self.created = 0
        self.recreated = 0

    async def open(self, policy: api.DeliverPolicy, start_seq: int | None = None) -> api.ConsumerInfo:
        """Subscribe to a fresh inbox first, then create the consumer that delivers into it."""
        queue = Feed()
        nc = self.bus._nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, future=queue)  # type: ignore[arg-type]
        name = f"tap{nuid.NUID().next().decode().lower()}"
        config = api.ConsumerConfig(
            name=name,
            filter_subject=self.filter,
            deliver_subject=inbox,
            deliver_policy=policy,
            opt_start_seq=start_seq,
            ack_policy=api.AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=_HEARTBEAT_S,
            # removes the consumer soon after nobody listens: readers that may not delete consumers
            # (every role but admin) leave theirs to this
            inactive_threshold=_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            info: api.ConsumerInfo = await self.bus._through_failover(
                f"replay of {self.filter}",
                lambda: self.bus._js.add_consumer(self.stream, config),
                refusal=f"$JS.API.CONSUMER.CREATE.{self.stream}.{name}.{self.filter}",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        old = (self.sub, self.consumer)
        self.sub, self.consumer, self.queue, self.last_cseq = sub, name, queue, 0
        self.created += 1
        delivered = info.delivered.stream_seq if info.delivered else 0
        self.next_seq = max(self.next_seq, (delivered or 0) + 1, start_seq or 0)
        if old[0] is not None:
            await self._drop(*old)
        return info

    async def next(self) -> Delivery | None:
        """The next stored message in order, or None once the connection is closed for good."""
        while True:
            waiting = self.queue.msgs
            msg = self.queue.pop() if waiting else await self._take()  # no coroutine for what is here
            if msg is None:
                return None
            if msg is _STALLED:
                await self._recreate(
                    "messages dropped past the buffer" if self.queue.dropped else "no message or heartbeat"
                )
                continue
            headers = msg.headers or {}
            if not (msg.reply or "").startswith("$JS.ACK."):  # heartbeat or flow control, not a record
                if await self._control(msg):
                    await self._recreate("the heartbeat shows a missed message")
                continue
            seq, cseq, pending, ts = _ack_reply_fields(msg)
            if cseq and cseq != self.last_cseq + 1:
                await self._recreate(f"consumer sequence {cseq} after {self.last_cseq}")
                continue
            self.last_cseq = cseq
            if seq < self.next_seq:
                continue  # delivered again by a recreated consumer: never a duplicate
            self.next_seq = seq + 1
            return Delivery(msg.subject, msg.data, headers, seq=seq, num_pending=pending, timestamp_ns=ts)

    async def _take(self) -> Msg | None:
        queue = self.queue
        if queue.msgs:
            return queue.pop()
        if queue.dropped:
            stalled: Msg = _STALLED
            return stalled  # what came past the buffer was dropped: start again from the first missing
        if self.bus._link.closed.is_set():
            return None
        if self._closing is None:  # one waiter on the connection's end for the life of the tap
            self._closing = asyncio.ensure_future(self.bus._link.closed.wait())
            self._closing.add_done_callback(lambda _: self.queue.wake())
        return await queue.next_within(_STALL_S) or (None if self.bus._link.closed.is_set() else _STALLED)

    async def _control(self, msg: Msg) -> bool:
        """Answer flow control; True if a heartbeat says a message went missing."""
        headers = msg.headers or {}
        nc = self.bus._nc
        if msg.reply:  # flow control request: the reader has come this far
            with contextlib.suppress(Exception):
                await nc.publish(msg.reply, b"")
            return False
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            with contextlib.suppress(Exception):
                await nc.publish(stalled, b"")
        last = headers.get("Nats-Last-Consumer")
        return bool(last and last.isdigit() and int(last) != self.last_cseq)

    async def _recreate(self, why: str) -> None:
        logger.debug("replay of %s: %s; resuming from stream sequence %d", self.filter, why, self.next_seq)
        self.recreated += 1
        await self.open(api.DeliverPolicy.BY_START_SEQUENCE, self.next_seq)

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        if self.sub is not None:
            await self._drop(self.sub, self.consumer)
            self.sub = None

    async def _drop(self, sub: Any, consumer: str) -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        # Unsubscribing leaves the server-side consumer, and a stream allows about a thousand:
        # whoever may delete it does so now; the inactive threshold removes the others' shortly.
        if self.bus.identity.role == "admin":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus._js.delete_consumer(self.stream, consumer), 2.0)


_STALLED: Any = object()


class Feed:
    """A tap's deliveries, handed over by nats-py's read loop (a subscription made with `future=`
    gives each message to `set_result`): no delivery task and no second queue per message.

    Flow control bounds what waits here: the server stops once the consumer's window is sent
    until the reader takes its request off this queue (`Tap._control`). Past `_REPLAY_BUFFER`
    messages or `_REPLAY_BYTES` of payload anyway (a server that ignores it), messages are
    dropped: the gap in consumer sequences makes the tap recreate its consumer from the first one
    missing, so nothing is lost, only re-sent."""

    def __init__(self) -> None:
        self.msgs: collections.deque[Msg] = collections.deque()
        self.size = 0  # payload bytes in msgs
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0

    def cancelled(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        # called in nats-py's read loop: nothing here may raise
        if len(self.msgs) >= _REPLAY_BUFFER or self.size >= _REPLAY_BYTES:
            self.dropped += 1  # the reader recreates the consumer once it has taken what is here
            return
        self.msgs.append(msg)
        self.size += len(msg.data)
        self.wake()

    def pop(self) -> Msg:
        msg = self.msgs.popleft()
        self.size -= len(msg.data)
        return msg

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_within(self, timeout: float) -> Msg | None:
        """The next message, waiting up to `timeout` seconds (None: none came, or `wake` was called)."""
        if not self.msgs:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, self.wake)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self.pop() if self.msgs else None
