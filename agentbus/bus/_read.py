"""Reading: ordered replay that turns into a live follow with no gap, and single-message lookups."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api

from agentbus import roles
from agentbus.bus._core import BusCore, logger
from agentbus.bus._errors import TRANSIENT, ErrorCode, description
from agentbus.bus._tap import Tap
from agentbus.bus._types import Delivery, Stored, direct_delivery
from agentbus.errors import BusError, NotPermitted

T = TypeVar("T")
# Messages a batched direct get asks for at most. The server answers this many in one request
# (5,000 and more checked on 2.15), so a whole read of even a long log is one exact request from
# sequence 1; a server that sends fewer than asked is gone on from where it stopped.
_DIRECT_BATCH = 10_000
_FIRST_ASK = 2  # what a whole read asks for first: a fresh session's creation and route, read in one request
_COUNTED_ROUNDS = 3  # whole reads from the start before one goes on from where it stands (a busy session)
_TAIL_STEPS = 16  # single gets a read from further on makes before it reads the whole subject instead


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
        tap = Tap(self, stream, filter_subject)
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
        self,
        stream: str,
        subject: str,
        convert: Callable[[Delivery], T],
        from_seq: int = 1,
        limit: int | None = None,
        last: int | None = None,
    ) -> list[T]:
        """The stored messages on `subject` (wildcards allowed) from `from_seq` on, in order, each as
        `convert` makes it, with no consumer. Each is converted as it arrives, in the connection's
        read loop while the server is still sending the rest: `convert` must be quick and pure
        (answers to an attempt given up on and asked again are converted again), and what it raises
        is raised here. Needs the unscoped direct-get permission (`$JS.API.DIRECT.GET.<stream>`):
        readers of every session have it.

        The server is never asked past the subject's last message. A batched direct get asked for
        more than is left searches the rest of the stream for another match, and one that starts
        past the subject's first message counts what is pending the slow way: with a session's
        records on a wildcard, both cost the server time in proportion to everything stored after
        the session (reading a session with 50,000 sessions' records after it: 8 ms instead of 0.3).
        So a read from the start asks from sequence 1 for what it knows is there (the first answer
        says how many more match, `_read_counted`), and a read from further on steps through single
        gets up to the subject's last message, looked up first (`_read_tail`) unless the caller
        just did and passes it as `last` (the read then ends there)."""
        seq = max(from_seq, 1)
        if limit == 1:  # the router's look at a session's first record: one answer, no closing status
            one = functools.partial(self._direct_one, stream, subject, seq)
            found = await self._through_failover(f"read of {subject}", one, refusal=f"$JS.API.DIRECT.GET.{stream}")
            return [convert(found)] if found is not None else []
        if limit is not None and limit <= 0:
            return []
        if seq == 1:
            return await self._read_counted(stream, subject, convert, limit)
        return await self._read_tail(stream, subject, convert, seq, limit, last)

    async def _read_counted(
        self, stream: str, subject: str, convert: Callable[[Delivery], T], limit: int | None, skip_below: int = 0
    ) -> list[T]:
        """From sequence 1: first as many as a fresh session holds (its creation and its route);
        the answer says how many more match, and the next request, from 1 again, asks for exactly
        that many. Messages appended meanwhile make a third; a log longer than one request (or a
        server sending fewer than asked) goes on from where the first full one ended, each request
        asking for what the last said is left."""
        want = _FIRST_ASK if limit is None else min(_FIRST_ASK, limit)
        for _ in range(_COUNTED_ROUNDS):
            found, received, last, pending = await self._batch(stream, subject, 1, want, convert, skip_below)
            if not pending:
                return found
            if limit is not None and received >= limit:
                return found[:limit]
            if received < want or want == _DIRECT_BATCH:
                break  # the server sent less than asked, or a full request is in hand: go on from its end
            total = received + pending if limit is None else min(received + pending, limit)
            want = min(total, _DIRECT_BATCH)
        out = found
        while pending and (limit is None or received < limit):
            want = min(pending, _DIRECT_BATCH) if limit is None else min(pending, _DIRECT_BATCH, limit - received)
            found, got, last, pending = await self._batch(stream, subject, last + 1, want, convert, skip_below)
            out += found
            received += got
            if not got:
                break
        return out

    async def _read_tail(
        self,
        stream: str,
        subject: str,
        convert: Callable[[Delivery], T],
        seq: int,
        limit: int | None,
        last: int | None = None,
    ) -> list[T]:
        """From `seq` on: the subject's last sequence first, then single gets up to it (each finds a
        match before the end, so none searches the rest of the stream); a tail longer than
        `_TAIL_STEPS` is read whole, counted, without what comes before `seq`."""
        if last is None:
            last = await self.last_subject_seq(stream, subject)
        out: list[T] = []
        for _ in range(_TAIL_STEPS):
            if seq > last or (limit is not None and len(out) >= limit):
                return out
            one = functools.partial(self._direct_one, stream, subject, seq)
            found = await self._through_failover(f"read of {subject}", one, refusal=f"$JS.API.DIRECT.GET.{stream}")
            if found is None:  # nothing left: the last message was removed meanwhile
                return out
            out.append(convert(found))
            seq = found.seq + 1
        if seq > last:
            return out
        rest = await self._read_counted(stream, subject, convert, None, skip_below=seq)
        return out + rest if limit is None else (out + rest)[:limit]

    async def _batch(
        self, stream: str, subject: str, seq: int, batch: int, convert: Callable[[Delivery], T], skip_below: int
    ) -> tuple[list[T], int, int, int]:
        call = functools.partial(self._direct_batch, stream, subject, seq, batch, convert, skip_below)
        return await self._through_failover(f"read of {subject}", call, refusal=f"$JS.API.DIRECT.GET.{stream}")

    async def _direct_one(self, stream: str, subject: str, seq: int) -> Delivery | None:
        request = json.dumps({"seq": seq, "next_by_subj": subject}).encode()
        msg = await self.ask(f"$JS.API.DIRECT.GET.{stream}", request, self.settings.publish_timeout_s)
        hdrs = msg.headers or {}
        if "Nats-Sequence" not in hdrs:  # a status: 404 none, or an error (a stored message has its sequence)
            if hdrs.get("Status") == "404":
                return None
            if hdrs.get("Status") == "503":
                raise await self._unavailable(stream, subject)
            raise BusError(f"direct get on {subject}: status {hdrs.get('Status')} {hdrs.get('Description', '')}")
        return direct_delivery(msg.data, hdrs)

    async def _direct_batch(
        self, stream: str, subject: str, seq: int, batch: int, convert: Callable[[Delivery], T], skip_below: int = 0
    ) -> tuple[list[T], int, int, int]:
        """One batch: what `convert` made of each message (from `skip_below` on), how many came,
        the last one's sequence, and how many more match past it."""
        replies = await self.replies()
        reply, collected = replies.many(convert, skip_below)
        request = json.dumps({"seq": seq, "next_by_subj": subject, "batch": batch}).encode()
        try:
            await self._nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=reply)
            hdrs = await collected.until_done(self.settings.publish_timeout_s)
        finally:
            replies.close(reply)
        if collected.failed is not None:  # ours to report, whatever status ended the batch
            raise collected.failed
        status = hdrs.get("Status")
        if status == "503":  # the whole batch is asked again
            raise await self._unavailable(stream, subject)
        if status not in ("204", "404"):  # 204: end of batch (with how many more match past it); 404: none
            raise BusError(f"direct get on {subject}: status {status} {hdrs.get('Description', '')}")
        pending = int(hdrs.get("Nats-Num-Pending") or 0) if status == "204" else 0
        return collected.found, collected.received, collected.last_seq, pending

    async def _unavailable(self, stream: str, subject: str) -> BaseException:
        """What to raise for a direct get nobody answered (503): a failover to go through (no replica
        of the stream serves reads yet, as while a restarted server recovers it), or at once a clear
        error when the stream does not exist. One look at the stream tells them apart; a user who
        may not look is not made to try (each refusal is a line in the server's log and in ours),
        and a look unanswered too counts as a failover."""
        look = f"$JS.API.STREAM.INFO.{stream}"
        failover = nats.js.errors.ServiceUnavailableError(code=503, description=f"no reader of {stream} answered")
        if self.identity.role is not None and not roles.permissions(self.identity).may_publish(look):
            return failover
        try:
            info = await self._refusable(look, lambda: self._js.stream_info(stream))
        except nats.js.errors.NotFoundError:
            return BusError(f"read of {subject}: no stream {stream} (not provisioned?)")
        except (NotPermitted, *TRANSIENT):  # type: ignore[misc]  # a tuple of exception classes
            return failover
        except nats.js.errors.APIError as err:
            if err.err_code == ErrorCode.STREAM_OFFLINE:  # its replicas are down: a failover too
                return failover
            return BusError(f"read of {subject}: {description(err)}")
        except nats.errors.Error as err:
            return BusError(f"read of {subject}: {description(err)}")
        if info.config.allow_direct is False:  # not ours to change here; provisioning turns it on
            failover.description = f"{stream} does not serve direct gets (its allow_direct is off)"
        return failover

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

    async def listen(
        self,
        subject: str,
        ready: asyncio.Event | None = None,
        skip: Callable[[bytes, bytes], bool] | None = None,
    ) -> AsyncIterator[tuple[str, bytes]]:
        """(subject, payload) of every message published on `subject` while this runs, stored or not.

        A signal, not a record: no consumer on the server, and a message missed (a reconnect, a
        slow reader) is not delivered again. Readers that must not miss one read the stream, or
        look again after a reconnect (`reconnects`). `ready` is set once the server has the
        subscription and did not refuse it (until then, and if refused, nothing is heard).
        `skip(subject, payload)`: messages it says True of are not delivered (dropped as they are
        read off the connection where it can: it must be quick, and what it raises delivers).
        """
        sub = await self._nc.subscribe(subject)
        skips: dict[int, Any] | None = getattr(self._nc, "skips", None)
        if skip is not None and skips is not None:
            skips[sub._id] = skip  # removed with the subscription, confirmed or not
        if ready is not None:
            try:
                await self._nc.flush()
                await self._nc.flush()  # a refusal arrives as an error before the second pong
            except Exception as err:
                # not confirmed is not refused: end, so the caller subscribes again (a reader left
                # iterating here would never learn it is not live)
                if skips is not None:
                    skips.pop(sub._id, None)
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
                data = bytes(msg.data)
                if skip is not None and _skips(skip, msg.subject.encode(), data):
                    continue  # a connection without the quick parser delivers everything
                yield msg.subject, data
        finally:
            if skips is not None:
                skips.pop(sub._id, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _skips(skip: Callable[[bytes, bytes], bool], subject: bytes, data: bytes) -> bool:
    try:
        return skip(subject, data)
    except Exception:
        return False
