"""Reading: ordered replay that turns into a live follow with no gap, and single-message lookups."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from agentbus.bus._core import BusCore
from agentbus.bus._types import Delivery, Stored
from agentbus.errors import BusError

_REPLAY_BUFFER = 1024


def _ack_reply_fields(msg: Msg) -> tuple[int, int, int]:
    """Stream sequence, pending and timestamp (ns) straight from the ack subject (no datetime)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>
        return int(tokens[5]), int(tokens[8]), int(tokens[7])
    meta = msg.metadata
    ts = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0
    return meta.sequence.stream, meta.num_pending, ts


class Reading(BusCore):
    async def replay(
        self,
        stream: str,
        filter_subject: str,
        *,
        start_seq: int | None = None,
        new_only: bool = False,
        follow: bool = True,
    ) -> AsyncIterator[Delivery]:
        """Replay stored messages in order, then (if `follow`) keep yielding new ones.

        One ordered consumer does both, so there is no gap and no duplicate at the
        switch from history to live: the usual bug of reading history and then
        subscribing is impossible by construction.
        """

        def config() -> api.ConsumerConfig:
            # fresh for every attempt: nats-py writes the deliver subject into the config it is given
            if new_only:
                cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW)
            elif start_seq and start_seq > 1:
                cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
            else:
                cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
            # A backstop only: the finally below deletes the consumer as soon as the reader is done.
            cfg.inactive_threshold = 5.0
            return cfg

        queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=_REPLAY_BUFFER)

        async def _on_msg(msg: Msg) -> None:
            # A full queue stalls nats-py's delivery task, so flow control still bounds memory.
            await queue.put(msg)

        async def subscribe() -> Any:
            # nats-py creates the consumer, then subscribes to its inbox: an attempt whose reply
            # was lost leaves a consumer nobody listens to, which inactive_threshold removes.
            return await self._js.subscribe(
                filter_subject, stream=stream, ordered_consumer=True, config=config(), cb=_on_msg
            )

        sub = await self._through_failover(f"replay of {filter_subject}", subscribe)
        try:
            if not follow:
                info = await sub.consumer_info()
                # Delivered-but-not-yet-received messages count as not pending: only an
                # empty start (nothing delivered either) may end the read right away.
                delivered = info.delivered.consumer_seq if info.delivered else 0
                if info.num_pending == 0 and not delivered and queue.empty():
                    return
            while True:
                msg = queue.get_nowait() if not queue.empty() else await self._next_or_closed(queue)
                if msg is None:
                    return
                seq, pending, ts = _ack_reply_fields(msg)
                yield Delivery(
                    subject=msg.subject,
                    data=msg.data,
                    headers=msg.headers or {},
                    seq=seq,
                    num_pending=pending,
                    timestamp_ns=ts,
                )
                if not follow and pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # Unsubscribing leaves the server-side consumer; a stream allows a limited number.
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(stream, sub._consumer)

    async def _next_or_closed(self, queue: asyncio.Queue[Msg]) -> Msg | None:
        """Slow path, only when caught up: the next message, or None once the connection is closed."""
        get = asyncio.ensure_future(queue.get())
        closed = asyncio.ensure_future(self._link.closed.wait())
        try:
            done, _ = await asyncio.wait((get, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not get.done():
                get.cancel()
        return get.result() if get in done else None

    async def last_subject_seq(self, stream: str, subject: str) -> int:
        """Stream sequence of the last message on exactly `subject`, 0 if there is none."""
        try:
            msg = await self._through_failover(
                f"last message on {subject}", lambda: self._js.get_last_msg(stream, subject)
            )
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def subject_counts(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Message count per subject matching the filter (one request, however many subjects)."""
        info = await self._through_failover(
            f"subjects of {stream}", lambda: self._js.stream_info(stream, subjects_filter=subjects_filter)
        )
        return dict(info.state.subjects or {})

    async def stream_last_seq(self, stream: str) -> int:
        info = await self._through_failover(f"state of {stream}", lambda: self._js.stream_info(stream))
        return int(info.state.last_seq)

    async def get_stored(self, stream: str, seq: int) -> bytes | None:
        """The payload stored at `seq`, or None if it is gone."""
        try:
            msg = await self._through_failover(f"message {seq} of {stream}", lambda: self._js.get_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            return None
        return bytes(msg.data or b"")

    async def next_stored(self, stream: str, subject: str, seq: int = 1) -> Stored | None:
        """The first message on `subject` at or after `seq`, or None."""
        try:
            msg = await self._through_failover(
                f"next message on {subject}", lambda: self._js.get_msg(stream, seq=seq, subject=subject, next=True)
            )
        except nats.js.errors.NotFoundError:
            return None
        return Stored(int(msg.seq or 0), bytes(msg.data or b""), msg.time.timestamp() if msg.time else 0.0)

    async def delete_stored(self, stream: str, seq: int) -> None:
        """Remove one stored message; one already gone is fine."""
        try:
            await self._through_failover(f"delete {seq} of {stream}", lambda: self._js.delete_msg(stream, seq))
        except nats.js.errors.NotFoundError:
            return
        except nats.js.errors.APIError as err:
            if err.code == 404 or "not found" in (err.description or "").lower():
                return
            raise BusError(f"cannot delete message {seq} of {stream}: {err.description}") from err

    async def announcements(self, subject: str) -> AsyncIterator[bytes]:
        """Core messages on `subject` while this runs (what the server announces, not stored)."""
        async for _, data in self.listen(subject):
            yield data

    async def listen(self, subject: str) -> AsyncIterator[tuple[str, bytes]]:
        """(subject, payload) of every message published on `subject` while this runs, stored or not.

        A signal, not a record: no consumer on the server, and a message missed (a reconnect, a
        slow reader) is not delivered again. Readers that must not miss one read the stream.
        """
        sub = await self._nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                yield msg.subject, bytes(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
