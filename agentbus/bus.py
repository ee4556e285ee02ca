"""The bus layer: the only module that touches raw nats-py objects.

Everything above it speaks in `PubAck`, `Delivery` and `Job`. Headers are set
here and only here: `Nats-Msg-Id` for deduplication, `traceparent` for tracing,
and the expected-last-subject-sequence fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.config import Settings
from agentbus.errors import BusError, FencedError, NatsUnreachable, UsageError
from agentbus.subjects import BucketSpec, ConsumerSpec, Namespace, StreamSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a failover looks like from the client: a request timing out, nobody answering the
# API subject yet, or JetStream saying it is temporarily unavailable.
_TRANSIENT = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = 10071  # JetStream API error code for a failed fence
_STREAM_NAME_IN_USE = 10058
_CONSUMER_EXISTS = 10148
_INSUFFICIENT_RESOURCES = 10023
_PIPELINE_DEPTH = 256
_REPLAY_BUFFER = 1024


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's receipt for one publish."""

    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """Where a durable consumer stands: messages waiting for it, delivered and unacked, and the
    stream sequence of the last one it delivered."""

    name: str
    waiting: int
    in_flight: int
    delivered_seq: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stored message as read back (ordered replay)."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int
    num_pending: int
    timestamp_ns: int


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: where, what, and the id that deduplicates it."""

    subject: str
    data: bytes
    msg_id: str
    headers: Mapping[str, str] | None = None


class Job:
    """A message pulled from a work queue; the holder must settle it exactly once."""

    __slots__ = ("_msg", "attempt", "data", "headers", "seq", "subject")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        meta = msg.metadata
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: Mapping[str, str] = dict(msg.headers or {})
        self.seq: int = meta.sequence.stream
        self.attempt: int = meta.num_delivered

    @property
    def trace_context(self) -> Any:
        """The trace context of whoever published this job (start the work's span under it)."""
        return tracing.context_from(self.headers)

    async def ack(self, *, sync: bool = True) -> None:
        """Done: the server removes it. `sync` waits for the server to confirm, so a lost ack
        cannot redeliver finished work; skip it only where a redelivery is harmless."""
        if sync:
            await self._msg.ack_sync(timeout=5.0)
        else:
            await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        """Give it back for another worker (now, or after `delay` seconds)."""
        await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        """Still working: reset the ack timer."""
        await self._msg.in_progress()

    @contextlib.asynccontextmanager
    async def kept_alive(self, every: float) -> AsyncIterator[None]:
        """In-progress acks every `every` seconds while the body runs (a long model call or check
        must never look like a dead worker)."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(every)
                with contextlib.suppress(Exception):
                    await self._msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()

    async def term(self) -> None:
        """Never redeliver (the reason must already be recorded where people look)."""
        await self._msg.term()


class Bus:
    """A connection to NATS with JetStream, provisioned for one namespace."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=settings.publish_timeout_s)
        self.settings = settings
        # JSON escaping can make a prompt up to 6x longer (control characters become \\u00XX).
        self.ns = Namespace(settings.prefix, max_message_bytes=settings.max_prompt_bytes * 6 + 65536)
        self._kv: dict[str, Any] = {}
        self._updating = False
        self._closed = asyncio.Event()

    @classmethod
    async def connect(cls, settings: Settings, *, name: str = "agentbus") -> Bus:
        """Connect, failing fast with `NatsUnreachable` instead of retrying forever; a service
        started beside its server (compose, systemd) sets `connect_wait_s` to keep trying that long."""
        for server in filter(None, (u.strip() for u in settings.nats_url.split(","))):
            # nats-py reads a bare HOST[:PORT] as nats://HOST[:PORT]
            parsed = urllib.parse.urlparse(server if "//" in server else f"nats://{server}")
            try:
                parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
            except ValueError:
                parsed = parsed._replace(netloc="")
            if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
                # a typo is not worth waiting for: fail now, whatever connect_wait_s says
                raise UsageError(
                    f"bad NATS URL {server.strip()!r}: expected nats://HOST:PORT (or tls://, ws://, wss://)"
                )
        deadline = time.monotonic() + settings.connect_wait_s
        while True:
            try:
                return await cls._connect_once(settings, name=name)
            except NatsUnreachable as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.warning("%s; trying again for up to %.0fs", err, left)
                await asyncio.sleep(min(1.0, left))

    @classmethod
    async def _connect_once(cls, settings: Settings, *, name: str) -> Bus:
        url = settings.nats_url
        # "nats://a:4222,nats://b:4222" names the seed servers of a cluster, as NATS_URL does for the nats CLI
        servers = [u.strip() for u in url.split(",") if u.strip()]

        async def _quiet(_: Exception) -> None:
            return None

        closed = asyncio.Event()

        async def _on_closed() -> None:
            closed.set()

        try:
            # nats-py retries a first connect forever when reconnects are allowed; we want a
            # clear failure now, and reconnects only once a connection has worked.
            nc = await nats.connect(
                servers,
                name=name,
                connect_timeout=settings.connect_timeout_s,
                allow_reconnect=False,
                max_reconnect_attempts=1,  # the server-pool loop otherwise tries 60 times
                reconnect_time_wait=0.2,
                drain_timeout=5,
                error_cb=_quiet,
                closed_cb=_on_closed,
            )
        except (TimeoutError, OSError, nats.errors.NoServersError, nats.errors.TimeoutError) as err:
            raise NatsUnreachable(url, str(err) or type(err).__name__) from err
        except Exception as err:  # nats-py raises bare errors for bad URLs
            raise NatsUnreachable(url, str(err) or type(err).__name__) from err
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 0.5
        bus = cls(nc, settings)
        bus._closed = closed
        return bus

    async def close(self) -> None:
        if not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def connected_url(self) -> str:
        url = self._nc.connected_url
        return url.geturl() if url else self.settings.nats_url

    async def _through_failover(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent JetStream request, retrying through a failover (a timeout, no
        responders or 503 while a cluster elects a new leader or the client reconnects) for up
        to `failover_s`. Publishes qualify: the retry carries the same Nats-Msg-Id, and the
        server checks duplicates before the fence, so a stored first attempt is not refused."""
        deadline = time.monotonic() + self.settings.failover_s
        delay = 0.1
        while True:
            try:
                return await call()
            except _TRANSIENT as err:
                if time.monotonic() + delay > deadline:
                    raise BusError(
                        f"{what}: JetStream did not answer within {self.settings.failover_s:.0f}s"
                        f" ({type(err).__name__})"
                    ) from err
                log.info("%s: %s; retrying", what, type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # --- provisioning -----------------------------------------------------------------------

    async def provision(self, *, update: bool = True) -> None:
        """Create (and, with `update`, reconfigure) every stream and bucket of the namespace.

        Services update, so a new version's limits take effect; clients only create.
        """
        try:
            await self._through_failover("JetStream", self._js.account_info)
        except BusError as err:
            raise NatsUnreachable(
                self.settings.nats_url,
                f"JetStream did not answer for {self.settings.failover_s:.0f}s: the server runs without"
                " JetStream (start it with -js), or its cluster has not elected a leader yet",
            ) from err
        for spec in self.ns.streams():
            try:
                await self.ensure_stream(spec, update=update)
            except BusError as err:
                if not spec.optional:
                    raise
                log.warning("going on without stream %s: %s", spec.name, err)
        self._updating = update
        for bucket in self.ns.buckets():
            await self.ensure_bucket(bucket)

    async def ensure_stream(self, spec: StreamSpec, *, update: bool = True) -> None:
        config = api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=api.RetentionPolicy(spec.retention),
            storage=api.StorageType(self.settings.storage),
            num_replicas=self.settings.replicas,
            duplicate_window=spec.duplicate_window_s,
            max_age=spec.max_age_s,
            max_bytes=spec.max_bytes,
            max_msg_size=spec.max_msg_size,
            discard=api.DiscardPolicy(spec.discard),
            allow_direct=spec.allow_direct,
        )
        # An existing stream is never re-created (with other replicas, a server without a
        # cluster would refuse even to look); only a missing one is made with the settings.
        if not await self.stream_exists(spec.name):
            try:
                await self._js.add_stream(config)
                return
            except nats.js.errors.APIError as err:
                if err.err_code != _STREAM_NAME_IN_USE:  # in use: another process made it just now
                    raise BusError(f"cannot create stream {spec.name}: {err.description}") from err
        if update:
            await self._keep_replicas(spec.name, config)
            try:
                await self._js.update_stream(config)
            except nats.js.errors.APIError as err:
                raise BusError(f"cannot update stream {spec.name}: {err.description}") from err

    async def _keep_replicas(self, stream: str, config: api.StreamConfig | None = None) -> None:
        """Replication is the operator's call: an existing stream keeps its replica count (an
        update with another count moves data and can leave the stream leaderless for a while).
        A count that differs from AGENTBUS_REPLICAS is reported, with the command that changes it."""
        have = await self.stream_replicas(stream)
        if have != self.settings.replicas:
            log.warning(
                "stream %s has %d replica(s), AGENTBUS_REPLICAS is %d; keeping %d (change it with "
                "`nats stream edit %s --replicas %d` when the cluster is quiet)",
                stream, have, self.settings.replicas, have, stream, self.settings.replicas,
            )  # fmt: skip
        if config is not None:
            config.num_replicas = have

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            filter_subject=spec.filter_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait_s,
            max_deliver=spec.max_deliver,
            max_ack_pending=spec.max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
        )

        async def create() -> Any:
            try:
                return await self._js.add_consumer(spec.stream, config)
            except nats.js.errors.APIError as err:
                if err.err_code == _INSUFFICIENT_RESOURCES:
                    # the stream's peers are still being placed (just created, or just raised
                    # to more replicas): a moment later the consumer fits
                    raise TimeoutError(err.description) from err
                raise

        try:
            await self._through_failover(f"consumer {spec.durable}", create)
        except nats.js.errors.APIError as err:
            if err.err_code != _CONSUMER_EXISTS:
                raise BusError(f"cannot create consumer {spec.durable}: {err.description}") from err
            # The first creator's limits stand: agents of one pool must agree on ack wait and
            # max deliver, and the last one to start must not silently change them for all.
            log.info("consumer %s exists with other limits; keeping them", spec.durable)

    async def ensure_bucket(self, spec: BucketSpec) -> None:
        if spec.name in self._kv:
            return
        try:
            kv = await self._through_failover(f"bucket {spec.name}", lambda: self._js.key_value(spec.name))
            if self._updating:
                await self._keep_replicas(f"KV_{spec.name}")
        except nats.js.errors.BucketNotFoundError:
            kv = await self._js.create_key_value(
                api.KeyValueConfig(
                    bucket=spec.name,
                    history=spec.history,
                    ttl=spec.ttl_s or None,
                    storage=api.StorageType(self.settings.storage),
                    replicas=self.settings.replicas,
                )
            )
        self._kv[spec.name] = kv

    # --- publishing -------------------------------------------------------------------------

    def headers(self, msg_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers every agentbus message carries."""
        hdrs: dict[str, str] = {MSG_ID: msg_id}
        propagate.inject(hdrs)
        if extra:
            hdrs.update(extra)
        return hdrs

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        expected_last_subject_seq: int | None = None,
    ) -> PubAck:
        """Publish to JetStream and wait for the stored ack; retries on a lost ack are deduplicated."""
        attrs = tracing.messaging_attrs(subject, msg_id)
        with tracing.span(f"publish {_span_subject(subject)}", kind=SpanKind.PRODUCER, attributes=attrs):
            return await self._publish(subject, data, msg_id, headers, expected_last_subject_seq)

    async def _publish(
        self,
        subject: str,
        data: bytes,
        msg_id: str,
        headers: Mapping[str, str] | None,
        expected_last_subject_seq: int | None,
    ) -> PubAck:
        hdrs = self.headers(msg_id, headers)
        if expected_last_subject_seq is not None:
            hdrs[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_last_subject_seq)
        try:
            try:  # the common case without the retry machinery: appends are the hot path
                ack = await self._publish_once(subject, data, hdrs)
            except _TRANSIENT:
                ack = await self._through_failover(
                    f"publish to {subject}", lambda: self._publish_once(subject, data, hdrs)
                )
        except nats.js.errors.APIError as err:
            if err.err_code == _WRONG_LAST_SEQUENCE:
                raise FencedError(subject, expected_last_subject_seq or 0) from err
            raise BusError(f"publish to {subject} refused: {err.description}") from err
        except nats.js.errors.NoStreamResponseError as err:
            raise BusError(f"publish to {subject}: no stream stores this subject (not provisioned?)") from err
        except nats.errors.ConnectionClosedError as err:
            raise NatsUnreachable(self.settings.nats_url, "connection closed") from err
        except nats.errors.MaxPayloadError as err:
            raise BusError(
                f"publish to {subject}: {len(data)} bytes is more than the server accepts "
                f"(max_payload {self._nc.max_payload})"
            ) from err
        return PubAck(ack.stream, ack.seq, bool(ack.duplicate))

    async def _publish_once(self, subject: str, data: bytes, hdrs: dict[str, str]) -> Any:
        try:
            return await self._js.publish(subject, data, headers=hdrs)
        except nats.js.errors.NoStreamResponseError as unanswered:
            # Nobody answered: either no stream takes this subject (a setup error, reported at
            # once) or its leader is moving to another server of the cluster (retried).
            try:
                await self._js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                raise unanswered from None
            except _TRANSIENT:
                pass
            raise TimeoutError(f"no leader for the stream of {subject}") from unanswered

    async def publish_many(self, messages: Iterable[Outgoing]) -> list[PubAck]:
        """Publish with up to 256 acks in flight; returns acks in input order, raises on the first refusal.

        Through a failover, the messages from the first unanswered one on are sent again one by
        one with their ids (stored ones come back as duplicates). A later message of the batch
        that was stored while an earlier one was not then precedes it in the stream.
        """
        with tracing.span("publish batch", kind=SpanKind.PRODUCER, attributes={"messaging.system": "nats"}):
            return await self._publish_many(messages)

    async def _publish_many(self, messages: Iterable[Outgoing]) -> list[PubAck]:
        batch = list(messages)
        pending: list[asyncio.Future[Any]] = []
        shared: dict[str, str] = {}
        propagate.inject(shared)  # one trace context for the whole batch: inject once, not per message
        for out in batch:
            hdrs = {MSG_ID: out.msg_id, **shared}
            if out.headers:
                hdrs.update(out.headers)
            try:
                pending.append(await self._js.publish_async(out.subject, out.data, headers=hdrs))
            except (nats.js.errors.TooManyStalledMsgsError, nats.errors.ConnectionClosedError) as err:
                for sent in pending:
                    sent.cancel()  # frees nats-py's slot for each; what was stored stays stored
                raise BusError(f"publish to {out.subject}: {type(err).__name__}") from err
            if len(pending) >= _PIPELINE_DEPTH and not pending[-_PIPELINE_DEPTH].done():
                # settled below, in order; bounded, as an ack lost with its server never comes
                await asyncio.wait([pending[-_PIPELINE_DEPTH]], timeout=self.settings.publish_timeout_s)
        acks: list[PubAck] = []
        for i, fut in enumerate(pending):
            if not fut.done():
                # nats-py never fails the future of an ack lost with its server: bound the wait
                # (only here: most acks are in by now, and a timer per message costs a third)
                await asyncio.wait([fut], timeout=self.settings.publish_timeout_s)
            try:
                if not fut.done():
                    raise TimeoutError("no ack")
                ack = fut.result()
            except nats.js.errors.APIError as err:
                if not isinstance(err, nats.js.errors.ServiceUnavailableError):
                    for rest in pending[i + 1 :]:
                        rest.cancel()
                    raise BusError(f"publish to {batch[i].subject} refused: {err.description}") from err
            except (*_TRANSIENT, nats.js.errors.NoStreamResponseError):
                pass
            else:
                acks.append(PubAck(ack.stream, ack.seq, bool(ack.duplicate)))
                continue
            # No answer for message i (a failover): settle the rest one by one, in order, with
            # their ids, so whatever was stored already comes back as a duplicate, not twice.
            # Cancelling frees nats-py's pending slot that a never-answered future would hold.
            for rest in pending[i:]:
                rest.cancel()
            for out in batch[i:]:
                acks.append(await self._publish(out.subject, out.data, out.msg_id, out.headers, None))
            break
        return acks

    # --- reading ----------------------------------------------------------------------------

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
        closed = asyncio.ensure_future(self._closed.wait())
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

    async def stream_replicas(self, stream: str) -> int:
        info = await self._through_failover(f"state of {stream}", lambda: self._js.stream_info(stream))
        return int(info.config.num_replicas or 1)

    async def stream_exists(self, stream: str) -> bool:
        try:
            await self._through_failover(f"state of {stream}", lambda: self._js.stream_info(stream))
        except nats.js.errors.NotFoundError:
            return False
        return True

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
        sub = await self._nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                yield bytes(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def consumer_backlog(self, spec: ConsumerSpec) -> tuple[int, int]:
        """(messages waiting for a worker, messages delivered and not yet acked) on a durable."""
        try:
            info = await self._through_failover(
                f"backlog of {spec.durable}", lambda: self._js.consumer_info(spec.stream, spec.durable)
            )
        except nats.js.errors.NotFoundError:
            return (0, 0)
        return (int(info.num_pending or 0), int(info.num_ack_pending or 0))

    async def consumer_states(self, stream: str) -> list[ConsumerState]:
        """Every durable consumer on `stream` and where it stands (one request per 256 consumers)."""
        out: list[ConsumerState] = []
        while True:
            page = functools.partial(self._js.consumers_info, stream, offset=len(out) or None)
            infos = await self._through_failover(f"consumers of {stream}", page)
            out += [
                ConsumerState(
                    name=str(i.name), waiting=int(i.num_pending or 0), in_flight=int(i.num_ack_pending or 0),
                    delivered_seq=int(i.delivered.stream_seq or 0) if i.delivered else 0,
                )
                for i in infos
            ]  # fmt: skip
            if len(infos) < 256:
                return out

    async def first_stored(self, stream: str, subject: str, from_seq: int = 1) -> tuple[int, float] | None:
        """(sequence, unix time) of the first message on `subject` at or after `from_seq`, or None."""
        try:
            msg = await self._through_failover(
                f"first on {subject}", lambda: self._js.get_msg(stream, seq=from_seq, subject=subject, next=True)
            )
        except nats.js.errors.NotFoundError:
            return None
        return int(msg.seq or 0), msg.time.timestamp() if msg.time else 0.0

    # --- work queues ------------------------------------------------------------------------

    async def pull(self, spec: ConsumerSpec) -> Puller:
        await self.ensure_consumer(spec)
        psub = await self._js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        return Puller(psub, spec)

    # --- key-value --------------------------------------------------------------------------

    async def kv_get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        kv = await self._bucket(bucket)
        try:
            entry = await self._through_failover(f"{bucket} {key}", lambda: kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b"", int(entry.revision or 0))

    async def kv_put_if(self, bucket: str, key: str, value: bytes, revision: int | None) -> bool:
        """Compare-and-set: write only if the key is still at `revision` (None: only if absent)."""
        kv = await self._bucket(bucket)
        # A retry after a lost reply finds its own write and reports a conflict: callers re-read
        # and decide again, which is right for a cache and, for a counter, errs on counting twice.
        try:
            if revision is None:
                await self._through_failover(f"{bucket} {key}", lambda: kv.create(key, value))
            else:
                await self._through_failover(f"{bucket} {key}", lambda: kv.update(key, value, last=revision))
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            return False
        return True

    async def kv_put(self, bucket: str, key: str, value: bytes) -> None:
        kv = await self._bucket(bucket)
        await self._through_failover(f"{bucket} {key}", lambda: kv.put(key, value))

    async def kv_delete(self, bucket: str, key: str) -> None:
        kv = await self._bucket(bucket)
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self._through_failover(f"{bucket} {key}", lambda: kv.purge(key))

    async def kv_values(self, bucket: str) -> dict[str, bytes]:
        """Every live key's value (expired and deleted keys left out)."""
        out: dict[str, bytes] = {}
        for key in await self.kv_keys(bucket):
            got = await self.kv_get(bucket, key)
            if got is not None and got[0]:
                out[key] = got[0]
        return out

    # --- core request/reply (no persistence: for questions whose answer is only useful now) ---

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        try:
            hdrs: dict[str, str] = {}
            propagate.inject(hdrs)
            msg = await self._nc.request(subject, data, timeout=timeout, headers=hdrs or None)
        except nats.errors.NoRespondersError as err:
            raise BusError(f"nobody answers on {subject} (is the supervisor running?)") from err
        except (TimeoutError, nats.errors.TimeoutError) as err:
            raise BusError(f"no answer on {subject} within {timeout:g}s") from err
        return bytes(msg.data)

    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> Callable[[], Awaitable[None]]:
        """Answer requests on `subject` (a queue group, so replicas share them); returns a stop function."""

        async def on_msg(msg: Msg) -> None:
            await msg.respond(await handler(msg.data))

        sub = await self._nc.subscribe(subject, queue="agentbus", cb=on_msg)
        return sub.unsubscribe

    async def kv_keys(self, bucket: str) -> list[str]:
        """Keys with a stored entry (a deleted key may be listed until its marker ages out;
        `kv_get` reads it as absent). One stream-info request: nats-py's `keys()` runs a
        watcher with no timeout, which a supervisor ticking twice a second cannot afford."""
        await self._bucket(bucket)
        prefix = f"$KV.{bucket}."
        counts = await self.subject_counts(f"KV_{bucket}", f"{prefix}>")
        return sorted(subject.removeprefix(prefix) for subject in counts)

    async def _bucket(self, name: str) -> Any:
        if name not in self._kv:
            await self.ensure_bucket(BucketSpec(name=name))
        return self._kv[name]


def _ack_reply_fields(msg: Msg) -> tuple[int, int, int]:
    """Stream sequence, pending and timestamp (ns) straight from the ack subject (no datetime)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>
        return int(tokens[5]), int(tokens[8]), int(tokens[7])
    meta = msg.metadata
    ts = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0
    return meta.sequence.stream, meta.num_pending, ts


def _span_subject(subject: str) -> str:
    """A subject with its session id masked, so span names stay few (semconv: low cardinality)."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[1] == "session":
        parts[2] = "{session}"
    return ".".join(parts)


class Puller:
    """A handle on a durable pull consumer: fetch batches of `Job`s."""

    def __init__(self, psub: Any, spec: ConsumerSpec) -> None:
        self._psub = psub
        self.spec = spec

    async def fetch(self, batch: int = 1, timeout: float = 5.0) -> Sequence[Job]:
        """Up to `batch` jobs; an empty list when none arrived in `timeout`."""
        try:
            msgs = await self._psub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either
            return []
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as err:
            # the consumer's leader is moving (a server of the cluster went away): wait, don't spin
            log.info("fetch from %s: %s; trying again", self.spec.durable, type(err).__name__)
            await asyncio.sleep(min(timeout, 0.5))
            return []
        return [Job(m) for m in msgs]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
