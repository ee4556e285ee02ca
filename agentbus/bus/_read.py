"""Reading: ordered replay that turns into a live follow with no gap, and single-message lookups."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import nats.js.errors
from nats import nuid
from nats.aio.msg import Msg
from nats.js import api

from agentbus.bus._core import BusCore, logger
from agentbus.bus._types import Delivery, Stored
from agentbus.errors import BusError

T = TypeVar("T")
_REPLAY_BUFFER = 65536  # messages a tap holds for its reader; flow control keeps it far below
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


_DIRECT_BATCH = 1000  # messages per batched direct get; more means another request


_MINUTES: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" -> seconds since the epoch: a log's records share a few


def _timestamp_ns(stamp: str) -> int:
    """`2026-11-30T07:21:47.836122756Z` to nanoseconds since the epoch (Python parses microseconds).

    A replay of a thousand records parses a thousand of these: the minute is looked up, the
    seconds and the fraction are read as digits; any other shape takes the general parser."""
    if len(stamp) >= 20 and stamp[-1] == "Z" and stamp[16] == ":" and (len(stamp) == 20 or stamp[19] == "."):
        sec, frac = stamp[17:19], stamp[20:-1]
        if sec.isascii() and sec.isdigit() and (not frac or (frac.isascii() and frac.isdigit())):
            minute = _MINUTES.get(stamp[:16])
            if minute is None:
                minute = _parse_seconds(stamp[:16])
                if minute is None:
                    return 0
                if len(_MINUTES) > 4096:
                    _MINUTES.clear()
                _MINUTES[stamp[:16]] = minute
            return (minute + int(sec)) * 1_000_000_000 + int((frac + "000000000")[:9])
    if not stamp:
        return 0
    whole, _, frac = stamp.rstrip("Z").partition(".")
    seconds = _parse_seconds(whole)
    if seconds is None:
        return 0
    try:
        return seconds * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    except ValueError:
        return 0


def _parse_seconds(whole: str) -> int | None:
    try:
        return int(datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp())
    except ValueError:
        return None


class Reading(BusCore):
    async def replay(
        self,
        stream: str,
        filter_subject: str,
        convert: Callable[[Delivery], T],
        *,
        start_seq: int | None = None,
        new_only: bool = False,
        follow: bool = True,
    ) -> AsyncGenerator[T, None]:
        """Replay stored messages in order (each as `convert` makes it: one generator, not two,
        between a reader and the wire), then (if `follow`) keep yielding new ones.

        One consumer does both, so there is no gap and no duplicate at the switch from history
        to live: the usual bug of reading history and then subscribing is impossible by
        construction. It is created on the filter-scoped API subject, so a user granted one
        session may read exactly that, and it delivers into the user's own inbox. Ordered-consumer
        semantics are kept by hand: a gap in the consumer sequence, or a consumer gone silent
        (no message and no heartbeat), recreates it from the last stream sequence seen + 1.
        """
        tap = _Tap(self, stream, filter_subject)
        if new_only:
            first = await tap.open(api.DeliverPolicy.NEW)
        elif start_seq and start_seq > 1:
            first = await tap.open(api.DeliverPolicy.BY_START_SEQUENCE, start_seq)
        else:
            first = await tap.open(api.DeliverPolicy.ALL)
        try:
            # Nothing stored past the start and nothing already on its way: a read that does not
            # follow is over before it began.
            delivered = first.delivered.consumer_seq if first.delivered else 0
            if not follow and first.num_pending == 0 and not delivered and not tap.queue.msgs:
                return
            while True:
                delivery = await tap.next()
                if delivery is None:
                    return
                yield convert(delivery)
                if not follow and delivery.num_pending == 0:
                    return
        finally:
            await tap.close()

    async def read_direct(
        self, stream: str, subject: str, from_seq: int = 1, limit: int | None = None
    ) -> list[Delivery]:
        """The stored messages on `subject` (wildcards allowed) from `from_seq` on, in order, with no
        consumer: batched direct gets, one request per thousand messages. Needs the unscoped
        direct-get permission (`$JS.API.DIRECT.GET.<stream>`): readers of every session have it."""
        out: list[Delivery] = []
        seq = max(from_seq, 1)
        api = f"$JS.API.DIRECT.GET.{stream}"
        while limit is None or len(out) < limit:
            want = _DIRECT_BATCH if limit is None else min(_DIRECT_BATCH, limit - len(out))
            batch = functools.partial(self._direct_batch, api, subject, seq, want)
            got, pending = await self._through_failover(f"read of {subject}", batch, refusal=api)
            out += got
            if not got or not pending:
                return out
            seq = got[-1].seq + 1
        return out

    async def _direct_batch(self, api: str, subject: str, seq: int, batch: int) -> tuple[list[Delivery], int]:
        replies = await self.replies()
        reply, collected = replies.many()
        request = json.dumps({"seq": seq, "next_by_subj": subject, "batch": batch}).encode()
        try:
            await self._nc.publish(api, request, reply=reply)
            end = await collected.until_done(self.settings.publish_timeout_s)
        finally:
            replies.close(reply)
        hdrs = end.headers or {}
        status = hdrs.get("Status")
        if status not in ("204", "404"):  # 204: end of batch (with how many more match past it); 404: none
            raise BusError(f"direct get on {subject}: status {status} {hdrs.get('Description', '')}")
        pending = int(hdrs.get("Nats-Num-Pending") or 0) if status == "204" else 0
        got = []
        for msg in collected.msgs:
            h = msg.headers or {}
            got.append(
                Delivery(
                    h.get("Nats-Subject", ""),
                    msg.data,
                    h,
                    int(h.get("Nats-Sequence") or 0),
                    int(h.get("Nats-Num-Pending") or 0),
                    _timestamp_ns(h.get("Nats-Time-Stamp", "")),
                )
            )
        return got, pending

    async def last_subject_seq(self, stream: str, subject: str) -> int:
        """Stream sequence of the last message on `subject` (wildcards allowed), 0 if there is none."""
        try:
            # A direct get names the subject in the API subject, so a user granted one session may
            # ask about exactly that session; the subject may be a wildcard (`<prefix>.session.<id>.>`).
            msg = await self._through_failover(
                f"last message on {subject}",
                lambda: self._js.get_last_msg(stream, subject, direct=True),
                refusal=f"$JS.API.DIRECT.GET.{stream}.{subject}",
            )
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def subject_counts(self, stream: str, subjects_filter: str) -> dict[str, int]:
        """Message count per subject matching the filter (one request, however many subjects)."""
        info = await self._through_failover(
            f"subjects of {stream}",
            lambda: self._js.stream_info(stream, subjects_filter=subjects_filter),
            refusal=f"$JS.API.STREAM.INFO.{stream}",
        )
        return dict(info.state.subjects or {})

    async def stream_last_seq(self, stream: str) -> int:
        info = await self._through_failover(
            f"state of {stream}", lambda: self._js.stream_info(stream), refusal=f"$JS.API.STREAM.INFO.{stream}"
        )
        return int(info.state.last_seq)

    async def get_stored(self, stream: str, seq: int) -> bytes | None:
        """The payload stored at `seq`, or None if it is gone."""
        try:
            msg = await self._through_failover(
                f"message {seq} of {stream}",
                lambda: self._js.get_msg(stream, seq),
                refusal=f"$JS.API.STREAM.MSG.GET.{stream}",
            )
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
            await self._through_failover(
                f"delete {seq} of {stream}",
                lambda: self._js.delete_msg(stream, seq),
                refusal=f"$JS.API.STREAM.MSG.DELETE.{stream}",
            )
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

    async def listen(self, subject: str, ready: asyncio.Event | None = None) -> AsyncIterator[tuple[str, bytes]]:
        """(subject, payload) of every message published on `subject` while this runs, stored or not.

        A signal, not a record: no consumer on the server, and a message missed (a reconnect, a
        slow reader) is not delivered again. Readers that must not miss one read the stream, or
        look again after a reconnect (`reconnects`). `ready` is set once the server has the
        subscription and did not refuse it (until then, and if refused, nothing is heard).
        """
        sub = await self._nc.subscribe(subject)
        if ready is not None:
            try:
                await self._nc.flush()
                await self._nc.flush()  # a refusal arrives as an error before the second pong
            except Exception as err:
                # not confirmed is not refused: end, so the caller subscribes again (a reader left
                # iterating here would never learn it is not live)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                raise BusError(f"subscription to {subject} not confirmed ({err})") from err
            else:
                if subject.lower() in self._link.violations:
                    logger.warning("the server refused a subscription to %s; going on without it", subject)
                else:
                    ready.set()
        try:
            async for msg in sub.messages:
                yield msg.subject, bytes(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class _Tap:
    """One scoped push consumer feeding a bounded queue, recreated after a gap or a stall.

    Flow control is answered only when the reader takes the request off the queue, so a slow
    reader slows the server instead of filling memory.
    """

    def __init__(self, bus: Reading, stream: str, filter_subject: str) -> None:
        self.bus = bus
        self.stream = stream
        self.filter = filter_subject
        self.queue = _Feed()
        self._closing: asyncio.Future[Any] | None = None
        self.sub: Any = None
        self.consumer = ""
        self.next_seq = 1  # the stream sequence to restart from
        self.last_cseq = 0
        self.created = 0
        self.recreated = 0

    async def open(self, policy: api.DeliverPolicy, start_seq: int | None = None) -> api.ConsumerInfo:
        """Subscribe to a fresh inbox first, then create the consumer that delivers into it."""
        queue = _Feed()
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
            msg = waiting.popleft() if waiting else await self._take()  # no coroutine for what is here
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
            return queue.msgs.popleft()
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


class _Feed:
    """A tap's deliveries, handed over by nats-py's read loop (a subscription made with `future=`
    gives each message to `set_result`): no delivery task and no second queue per message.

    Flow control bounds what waits here: the server stops once the consumer's window is sent
    until the reader takes its request off this queue (`_Tap._control`). Past `_REPLAY_BUFFER`
    anyway (a server that ignores it), messages are dropped: the gap in consumer sequences makes
    the tap recreate its consumer from the first one missing, so nothing is lost, only re-sent."""

    def __init__(self) -> None:
        self.msgs: collections.deque[Msg] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0

    def cancelled(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        # called in nats-py's read loop: nothing here may raise
        if len(self.msgs) >= _REPLAY_BUFFER:
            self.dropped += 1  # the reader recreates the consumer once it has taken what is here
            return
        self.msgs.append(msg)
        self.wake()

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
        return self.msgs.popleft() if self.msgs else None
