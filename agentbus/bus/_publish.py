"""Publishing: every message acked by JetStream, with its Nats-Msg-Id and trace context set here and only here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.bus._core import BusCore
from agentbus.bus._errors import TRANSIENT, ErrorCode
from agentbus.bus._types import Outgoing, PubAck
from agentbus.errors import BusError, FencedError, NatsUnreachable, NotPermitted

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
# nats-server 2.11+: the fence holds on the last message of this subject (wildcards allowed)
# instead of the published one's
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
# stored only if the stream's last message carries this Nats-Msg-Id (nothing stored in between)
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
_PIPELINE_DEPTH = 256
# no ack for a message of a batch: settle the rest one by one
_UNANSWERED: tuple[type[BaseException], ...] = (*TRANSIENT, nats.js.errors.NoStreamResponseError)


class _Ack(msgspec.Struct):
    """JetStream's answer to a publish: where it was stored, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


def span_subject(subject: str) -> str:
    """A subject with its session id masked, so span names stay few (semconv: low cardinality)."""
    parts = subject.split(".")
    if len(parts) >= 4 and parts[1] == "session":
        parts[2] = "{session}"
    return ".".join(parts)


class Publishing(BusCore):
    def headers(self, msg_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers every agentbus message carries."""
        hdrs: dict[str, str] = {MSG_ID: msg_id}
        tracing.inject(hdrs)
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
        fence_subject: str | None = None,
    ) -> PubAck:
        """Publish to JetStream and wait for the stored ack; retries on a lost ack are deduplicated.
        `expected_last_subject_seq` fences the publish on the last message of its subject, or of
        `fence_subject` (wildcards allowed) when given."""
        if fence_subject is not None and expected_last_subject_seq is not None:
            headers = {**(headers or {}), EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: fence_subject}
        if not tracing.recording():  # every append comes here: no span to name, no attributes to build
            return await self._publish(subject, data, msg_id, headers, expected_last_subject_seq)
        attrs = tracing.messaging_attrs(subject, msg_id)
        with tracing.span(f"publish {span_subject(subject)}", kind=SpanKind.PRODUCER, attributes=attrs):
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
            except TRANSIENT:
                ack = await self._through_failover(
                    f"publish to {subject}", lambda: self._publish_once(subject, data, hdrs)
                )
        except nats.js.errors.APIError as err:
            if err.err_code == ErrorCode.WRONG_LAST_SEQUENCE:
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
        return ack

    async def _publish_once(self, subject: str, data: bytes, hdrs: dict[str, str]) -> PubAck:
        try:
            # a subject this user may not publish to is refused by the server at once (NotPermitted)
            return await self._refusable(subject, lambda: self._acked(subject, data, hdrs))
        except nats.js.errors.NoStreamResponseError as unanswered:
            # Nobody answered: either no stream takes this subject (a setup error, reported at
            # once) or its leader is moving to another server of the cluster (retried).
            try:
                await self._refusable("$JS.API.STREAM.NAMES", lambda: self._js.find_stream_name_by_subject(subject))
            except (nats.js.errors.NotFoundError, NotPermitted):
                raise unanswered from None  # no stream, or this user may not look: say so now
            except TRANSIENT:
                pass
            raise TimeoutError(f"no leader for the stream of {subject}") from unanswered

    async def publish_together(self, messages: Sequence[Outgoing]) -> list[PubAck]:
        """Publish a few messages back to back and wait for their acks together: one round trip,
        not one each. Stored in the order given on one stream; across streams, each stream stores
        its own as it comes (a later one may be stored a moment before an earlier one). From the
        first ack that does not come (a failover), the messages are settled one by one with their
        ids; the first refusal, in order, is raised. A refusal of the first message's subject is
        reported at once (the others' after the ack wait, one by one)."""
        sent = [(m.subject, m.data, self.headers(m.msg_id, m.headers)) for m in messages]
        first = messages[0].subject
        try:
            answers = await self._refusable(first, lambda: self.ask_together(sent, self.settings.publish_timeout_s))
        except TRANSIENT as err:  # not sent whole (a reconnect): all of them one by one
            answers = [TimeoutError(str(err))] * len(messages)
        except nats.errors.ConnectionClosedError as err:
            raise NatsUnreachable(self.settings.nats_url, "connection closed") from err
        except nats.errors.MaxPayloadError as err:
            size = max(len(m.data) for m in messages)
            raise BusError(
                f"publish to {first}: {size} bytes is more than the server accepts (max_payload {self._nc.max_payload})"
            ) from err
        acks: list[PubAck] = []
        for i, (out, answer) in enumerate(zip(messages, answers, strict=True)):
            if not isinstance(answer, BaseException):
                try:
                    acks.append(self._ack_of(out.subject, answer))
                    continue
                except _UNANSWERED:
                    pass
                except nats.js.errors.APIError as err:
                    raise BusError(f"publish to {out.subject} refused: {err.description}") from err
            for rest in messages[i:]:  # no answer: this one and the rest one by one, in order
                acks.append(await self._publish(rest.subject, rest.data, rest.msg_id, rest.headers, None))
            break
        return acks

    async def publish_chained(
        self,
        first: Outgoing,
        then: Outgoing,
        *,
        expected_last_subject_seq: int,
        fence_subject: str | None = None,
    ) -> tuple[PubAck, PubAck | TimeoutError | FencedError | None]:
        """`first`, fenced as `publish` fences it, and `then` right behind it: one round trip for
        both. `then` carries `Nats-Expected-Last-Msg-Id` naming `first`'s id, so the server stores
        it only while the stream's last message is `first`: directly after it, and never when
        `first` was not stored. `first.msg_id` must be unique to this attempt: an id others share
        would let `then` follow their message.

        Only on one server (`one_server`); elsewhere `first` goes alone and `then` is left to the
        caller. Returns `first`'s ack (raising as `publish` does: `FencedError` for the fence) and
        `then`'s; None when this send did not store `then` (something came between, or an earlier
        message with its id), a `FencedError` when its own fence refused it, a `TimeoutError` when
        no answer came for it (it may be stored): the caller then appends it on its own, as without
        the chain, and finds it by its content if it was stored after all. nats-server checks a
        fence first, then the message id, then the expected last message id."""
        if not tracing.recording():
            return await self._publish_chained(first, then, expected_last_subject_seq, fence_subject)
        attrs = tracing.messaging_attrs(first.subject, first.msg_id)
        with tracing.span(f"publish {span_subject(first.subject)}", kind=SpanKind.PRODUCER, attributes=attrs):
            return await self._publish_chained(first, then, expected_last_subject_seq, fence_subject)

    async def _publish_chained(
        self, first: Outgoing, then: Outgoing, expected_last_subject_seq: int, fence_subject: str | None
    ) -> tuple[PubAck, PubAck | TimeoutError | FencedError | None]:
        alone = {**(first.headers or {})}  # `first` as `publish` sends it, when it goes alone
        if fence_subject is not None:
            alone[EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = fence_subject
        if not self.one_server:  # a cluster halts a replicated stream on a refused expectation
            return await self._publish(first.subject, first.data, first.msg_id, alone, expected_last_subject_seq), None
        head = self.headers(first.msg_id, {**alone, EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_subject_seq)})
        tail = self.headers(then.msg_id, {**(then.headers or {}), EXPECTED_LAST_MSG_ID: first.msg_id})
        sent = [(first.subject, first.data, head), (then.subject, then.data, tail)]
        try:
            answers = await self._refusable(
                first.subject, lambda: self.ask_together(sent, self.settings.publish_timeout_s)
            )
        except TRANSIENT as err:  # not sent whole (a reconnect): `first` alone, the usual way
            answers = [TimeoutError(str(err))] * 2
        except nats.errors.ConnectionClosedError as err:
            raise NatsUnreachable(self.settings.nats_url, "connection closed") from err
        except nats.errors.MaxPayloadError as err:
            size = max(len(first.data), len(then.data))
            raise BusError(
                f"publish to {first.subject}: {size} bytes is more than the server accepts "
                f"(max_payload {self._nc.max_payload})"
            ) from err
        try:
            if isinstance(answers[0], BaseException):
                raise answers[0]
            ack = self._ack_of(first.subject, answers[0])
        except _UNANSWERED:  # settled alone, through a failover; `then` may or may not be stored
            ack = await self._publish(first.subject, first.data, first.msg_id, alone, expected_last_subject_seq)
            return ack, TimeoutError(f"no answer for {first.subject}: {then.subject} may be stored")
        except nats.js.errors.APIError as err:
            if err.err_code == ErrorCode.WRONG_LAST_SEQUENCE:
                raise FencedError(first.subject, expected_last_subject_seq) from err
            raise BusError(f"publish to {first.subject} refused: {err.description}") from err
        answer = answers[1]
        if isinstance(answer, BaseException):
            return ack, TimeoutError(f"no answer for {then.subject}")
        try:
            after = self._ack_of(then.subject, answer)
        except nats.js.errors.NoStreamResponseError:
            return ack, TimeoutError(f"no stream answered for {then.subject}")
        except nats.js.errors.APIError as err:
            if err.err_code == ErrorCode.WRONG_LAST_SEQUENCE:
                return ack, FencedError(then.subject, 0)
            return ack, None  # refused: most often, something came between (10070)
        except BusError:  # an answer that does not read: stored or not, the log says
            return ack, TimeoutError(f"unreadable answer for {then.subject}")
        return ack, None if after.duplicate else after

    async def _acked(self, subject: str, data: bytes, hdrs: dict[str, str]) -> PubAck:
        """One publish and its ack: what nats-py's `js.publish` does, on the shared reply subscription."""
        return self._ack_of(subject, await self.ask(subject, data, self.settings.publish_timeout_s, hdrs))

    def _ack_of(self, subject: str, msg: Msg) -> PubAck:
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise nats.js.errors.NoStreamResponseError  # no responders: no stream (or no leader) takes it
        try:
            ack = _ack_decoder.decode(msg.data)
        except (msgspec.MsgspecError, UnicodeDecodeError) as err:
            raise BusError(f"publish to {subject}: unreadable answer from the server: {err}") from err
        if ack.error is not None:
            nats.js.errors.APIError.from_error(ack.error)  # raises the error's class (503: transient)
        return PubAck(ack.stream, ack.seq, ack.duplicate)

    async def publish_many(self, messages: Iterable[Outgoing]) -> list[PubAck]:
        """Publish with up to 256 acks in flight; returns acks in input order, raises on the first refusal.

        Through a failover, the messages from the first unanswered one on are sent again one by
        one with their ids (stored ones come back as duplicates). A later message of the batch
        that was stored while an earlier one was not then precedes it in the stream.
        """
        with tracing.span("publish batch", kind=SpanKind.PRODUCER, attributes={"messaging.system": "nats"}):
            return await self._publish_many(list(messages))

    async def _publish_many(self, batch: list[Outgoing]) -> list[PubAck]:
        pending = await self._send_pipelined(batch)
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
            except _UNANSWERED:
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

    async def _send_pipelined(self, batch: list[Outgoing]) -> list[asyncio.Future[Any]]:
        pending: list[asyncio.Future[Any]] = []
        shared: dict[str, str] = {}
        tracing.inject(shared)  # one trace context for the whole batch: inject once, not per message
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
                # settled by the caller, in order; bounded, as an ack lost with its server never comes
                await asyncio.wait([pending[-_PIPELINE_DEPTH]], timeout=self.settings.publish_timeout_s)
        return pending
