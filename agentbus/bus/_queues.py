"""Work queues: durable pull consumers handing out `Job`s that their holder settles exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from agentbus import tracing
from agentbus.bus._core import logger
from agentbus.bus._errors import description
from agentbus.bus._provision import Provisioning
from agentbus.bus._types import ConsumerState
from agentbus.errors import BusError
from agentbus.subjects import ConsumerSpec


def _ack_fields(msg: Msg) -> tuple[int, int, float]:
    """Stream sequence, times delivered and stored time (seconds) from the ack subject, read as
    nats-py's `metadata` reads them, without its dataclasses and datetimes (a work item's pickup
    read them for three numbers)."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"] and (len(tokens) == 9 or len(tokens) >= 11):
        at = 4 if len(tokens) == 9 else 6  # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>
        try:  # v2 adds a domain and an account hash after ACK (and a token at the end)
            delivered, seq, stamp = int(tokens[at]), int(tokens[at + 1]), int(tokens[at + 3])
        except ValueError:
            pass
        else:
            return seq, delivered, stamp / 1e9 if stamp else 0.0
    meta = msg.metadata  # not an ack subject: nats-py's error
    return meta.sequence.stream, meta.num_delivered, meta.timestamp.timestamp() if meta.timestamp else 0.0


class Job:
    """A message pulled from a work queue; the holder must settle it exactly once.

    Settling translates nats-py's errors: a failed ack, nak or term raises `BusError`.
    """

    __slots__ = ("_ask", "_msg", "attempt", "data", "headers", "seq", "stored_at", "subject")

    def __init__(self, msg: Msg, ask: Callable[[str, bytes, float], Awaitable[Any]] | None = None) -> None:
        self._msg = msg
        self._ask = ask  # the bus's request on its shared reply subscription (else nats-py's)
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: Mapping[str, str] = dict(msg.headers or {})
        # when the stream stored it (seconds since the epoch; 0.0 if the server did not say)
        self.seq, self.attempt, self.stored_at = _ack_fields(msg)

    @property
    def trace_context(self) -> Any:
        """The trace context of whoever published this job (start the work's span under it)."""
        return tracing.context_from(self.headers)

    async def ack(self, *, sync: bool = True) -> None:
        """Done: the server removes it. `sync` waits for the server to confirm, so a lost ack
        cannot redeliver finished work; skip it only where a redelivery is harmless."""
        try:
            if sync and self._ask is not None and self._msg.reply:
                answer = await self._ask(self._msg.reply, b"+ACK", 5.0)  # an ack asking for the server's word
                if answer.headers and answer.headers.get("Status") == "503":
                    raise BusError("no responders: the consumer's server did not take the ack")
            elif sync:
                await self._msg.ack_sync(timeout=5.0)
            else:
                await self._msg.ack()
        except Exception as err:
            raise BusError(f"ack of message {self.seq} on {self.subject}: {description(err)}") from err

    async def nak(self, delay: float | None = None) -> None:
        """Give it back for another worker (now, or after `delay` seconds)."""
        try:
            await self._msg.nak(delay=delay)
        except Exception as err:
            raise BusError(f"nak of message {self.seq} on {self.subject}: {description(err)}") from err

    async def in_progress(self) -> None:
        """Still working: reset the ack timer."""
        try:
            await self._msg.in_progress()
        except Exception as err:
            raise BusError(f"progress of message {self.seq} on {self.subject}: {description(err)}") from err

    async def term(self) -> None:
        """Never redeliver (the reason must already be recorded where people look)."""
        try:
            await self._msg.term()
        except Exception as err:
            raise BusError(f"term of message {self.seq} on {self.subject}: {description(err)}") from err

    def kept_alive(self, every: float) -> KeptAlive:
        """In-progress acks every `every` seconds while the body of `async with` runs (a long model
        call or check must never look like a dead worker)."""
        return KeptAlive(self._msg, every)


class KeptAlive:
    """`Job.kept_alive`: a timer, not a task. Nearly every job ends long before its first beat, and
    a task made and cancelled per job cost a one-step session two turns of the loop."""

    __slots__ = ("_beat", "_every", "_msg", "_timer")

    def __init__(self, msg: Msg, every: float) -> None:
        self._msg, self._every = msg, every
        self._timer: asyncio.TimerHandle | None = None
        self._beat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._every, self._due)

    async def __aexit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._beat is not None:
            self._beat.cancel()

    def _due(self) -> None:
        if self._beat is None or self._beat.done():  # one beat at a time, as before
            self._beat = asyncio.create_task(self._send())
        self._timer = asyncio.get_running_loop().call_later(self._every, self._due)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._msg.in_progress()


class Puller:
    """A handle on a durable pull consumer: fetch batches of `Job`s."""

    def __init__(self, psub: Any, spec: ConsumerSpec, ask: Callable[[str, bytes, float], Awaitable[Any]]) -> None:
        self._psub = psub
        self.spec = spec
        self._ask = ask

    async def fetch(self, batch: int = 1, timeout: float = 5.0) -> Sequence[Job]:
        """Up to `batch` jobs; an empty list when none arrived in `timeout`."""
        try:
            msgs = await self._psub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either
            return []
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as err:
            # the consumer's leader is moving (a server of the cluster went away): wait, don't spin
            logger.info("fetch from %s: %s; trying again", self.spec.durable, type(err).__name__)
            await asyncio.sleep(min(timeout, 0.5))
            return []
        except nats.errors.ConnectionClosedError as err:
            raise BusError(f"fetch from {self.spec.durable}: the connection is closed") from err
        return [Job(m, self._ask) for m in msgs]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()


# A standing pull request lives this long on the server (then it is made again), with heartbeats
# while it waits: three missed mean it is gone (the server restarted, the consumer's leader moved).
_PULL_EXPIRES_S = 30.0
_PULL_HEARTBEAT_S = 5.0
_REFUSED_PAUSE_S = 0.5


class Standing:
    """Jobs of a durable pull consumer through standing pull requests, topped up as slots free.

    `fetch` asks the server once per batch it returns, which under light load is once per message:
    one request per message per consumer (the router's, a pool's, the wake watchers') on every
    session. Here each request asks for the slots free at the time and stays open (with heartbeats)
    until it is filled or expires; a new one is made only when half the slots are neither covered by
    open requests nor busy, so a worker asks about once per `slots / 2` messages, never for more
    than it has slots for (other workers of the pool get the rest). Deliveries reach the buffer
    from nats-py's read loop (a subscription made with `future=`), with no task in between.
    """

    def __init__(self, queues: Queues, spec: ConsumerSpec, slots: int) -> None:
        self._queues = queues
        self.spec = spec
        self._threshold = max(1, slots // 2)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._feed: _Pulls | None = None
        self._sub: Any = None
        self._reconnects = queues.reconnects
        self.requests = 0

    async def start(self) -> None:
        await self._listen(_Pulls(self._queues._nc.new_inbox(), self.spec.durable))

    async def _listen(self, feed: _Pulls) -> None:
        self._sub = await self._queues._nc.subscribe(f"{feed.base}.*", future=feed)  # type: ignore[arg-type]
        self._feed = feed

    async def take(self, free: int, timeout: float) -> list[Job]:
        """Up to `free` jobs (every slot free now), waiting up to `timeout` for the first."""
        feed = self._feed
        assert feed is not None, "start() first"
        if feed.gone:
            raise BusError(f"consumer {self.spec.durable}: {feed.gone}")
        if self._queues.reconnects != self._reconnects or (
            feed.outstanding and time.monotonic() - feed.heard > 3 * _PULL_HEARTBEAT_S
        ):
            feed = await self._renew(feed)
        want = free - len(feed.msgs) - feed.outstanding
        if (
            want > 0
            and (want >= self._threshold or not feed.outstanding)
            and time.monotonic() >= feed.refused_until
            and self._queues._nc.is_connected  # a request kept for after a reconnect could not be counted
        ):
            await self._request(feed, want)
        if not feed.msgs:
            await feed.wait(timeout)
        jobs: list[Job] = []
        while feed.msgs and len(jobs) < free:
            jobs.append(Job(feed.msgs.popleft(), self._queues.ask))
        return jobs

    async def _renew(self, old: _Pulls) -> _Pulls:
        """Requests made before a reconnect, or gone silent, may be lost, or may be alive: ask again
        on a new reply subject and stop listening on the old one, so the old ones deliver nothing
        (the server skips a request nobody listens to) and never add to what this worker holds."""
        self._reconnects = self._queues.reconnects
        stale = self._sub
        feed = _Pulls(self._queues._nc.new_inbox(), self.spec.durable)
        feed.msgs = old.msgs  # delivered already: still ours to run or give back
        await self._listen(feed)
        with contextlib.suppress(Exception):
            await stale.unsubscribe()
        return feed

    async def _request(self, feed: _Pulls, batch: int) -> None:
        reply = feed.open_request(batch)
        request = {
            "batch": batch,
            "expires": int(_PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(_PULL_HEARTBEAT_S * 1e9),
        }
        try:
            await self._queues._nc.publish(self._next, json.dumps(request).encode(), reply=reply)
        except nats.errors.ConnectionClosedError as err:
            raise BusError(f"pull from {self.spec.durable}: the connection is closed") from err
        except nats.errors.Error as err:  # not sent: nothing will answer it
            feed.ended(reply, None)
            logger.info("pull from %s: %s; trying again", self.spec.durable, description(err))
        self.requests += 1

    def left(self) -> list[Job]:
        """Delivered and not taken (what arrived as the loop stopped): the caller gives them back."""
        feed = self._feed
        if feed is None:
            return []
        jobs = [Job(m, self._queues.ask) for m in feed.msgs]
        feed.msgs.clear()
        return jobs

    async def close(self) -> None:
        """Stop listening: the server drops waiting requests whose reply subject nobody listens to.
        Draining the subscription first lets what the server sent before it heard so still arrive
        (into `left`), instead of being dropped to wait out its ack wait."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class _Pulls:
    """The deliveries and status answers to a `Standing`'s requests. A message keeps its own
    subject and comes with a `$JS.ACK` reply; a status (100 heartbeat, 404, 408 expired, 409, 503)
    comes on the request's reply subject, with no reply. `outstanding` counts the messages the open
    requests may still deliver, as one total: the server fills waiting requests in turns, so a
    message cannot be told apart by request, while an ending request says how many it had left."""

    def __init__(self, base: str, durable: str) -> None:
        self.base = base
        self.durable = durable
        self.outstanding = 0
        # open request -> (batch, made at), for an end that does not say how many it had left
        self._batches: dict[str, tuple[int, float]] = {}
        self.msgs: collections.deque[Msg] = collections.deque()
        self.heard = time.monotonic()
        self.gone = ""  # why the consumer cannot deliver any more (deleted)
        self.refused_until = 0.0  # no new request before this (monotonic), after a refusal
        self._refusals = 0
        self._said = ""
        self._n = 0
        self._waiter: asyncio.Future[None] | None = None

    def open_request(self, batch: int) -> str:
        self._n += 1
        reply = f"{self.base}.{self._n:x}"
        now = time.monotonic()
        # A request filled to its batch ends with no status: forget those past their expiry. They
        # were made in time order, so the oldest come first; a busy worker makes a hundred
        # requests a second, and going over all it made in the last minute at each one cost more
        # than the pulls themselves.
        batches = self._batches
        while batches:
            oldest = next(iter(batches))
            if now - batches[oldest][1] < 2 * _PULL_EXPIRES_S:
                break
            del batches[oldest]
        batches[reply] = (batch, now)
        self.outstanding += batch
        self.heard = now
        return reply

    def ended(self, reply: str, pending: int | None) -> None:
        """A request is over with `pending` messages undelivered (None: it did not say; all of them)."""
        made = self._batches.pop(reply, None)
        if pending is None:
            pending = made[0] if made else 0
        self.outstanding = max(0, self.outstanding - pending)

    def cancelled(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        # called in nats-py's read loop: an exception here would stop the connection reading
        try:
            self._take(msg)
        except Exception:
            logger.exception("pull from %s: an answer could not be taken: %s", self.durable, msg.subject)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        if msg.reply and msg.reply.startswith("$JS.ACK."):  # a message (whatever headers it carries)
            self.outstanding = max(0, self.outstanding - 1)
            self.msgs.append(msg)
            self._refusals = 0
            return
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":  # idle heartbeat: the request still waits
            return
        pending = headers.get("Nats-Pending-Messages", "")
        self.ended(msg.subject, int(pending) if pending.isascii() and pending.isdigit() else None)
        what = headers.get("Description", "")
        if status == "408":  # expired: simply asked again
            return
        if status == "409" and "deleted" in what.lower():
            self.gone = f"deleted on the server ({what})"
            return
        # 409 (a leader moved, too many waiting, a batch or expiry over the consumer's limits), 503
        # (nobody serves the consumer now: a leader election, a restart): asking again at once would
        # be refused again, so not for a while, longer each time
        self._refusals += 1
        self.refused_until = time.monotonic() + min(_REFUSED_PAUSE_S * self._refusals, 5.0)
        said = f"{status} {what}".strip()
        if said != self._said:  # once per new reason, not every half second
            self._said = said
            logger.info("pull from %s refused (%s); asking again shortly", self.durable, said)

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Queues(Provisioning):
    async def standing(self, spec: ConsumerSpec, slots: int) -> Standing:
        """Jobs of the durable `spec` (made if missing) through standing pull requests for `slots`."""
        await self.ensure_consumer(spec)
        standing = Standing(self, spec, slots)
        await standing.start()
        return standing

    async def pull(self, spec: ConsumerSpec) -> Puller:
        await self.ensure_consumer(spec)
        psub = await self._through_failover(
            f"consumer {spec.durable}", lambda: self._js.pull_subscribe_bind(spec.durable, stream=spec.stream)
        )
        return Puller(psub, spec, self.ask)

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

    async def consumer_backlog(self, spec: ConsumerSpec) -> tuple[int, int]:
        """(messages waiting for a worker, messages delivered and not yet acked) on a durable."""
        try:
            info = await self._through_failover(
                f"backlog of {spec.durable}",
                lambda: self._js.consumer_info(spec.stream, spec.durable),
                refusal=f"$JS.API.CONSUMER.INFO.{spec.stream}.{spec.durable}",
            )
        except nats.js.errors.NotFoundError:
            return (0, 0)
        return (int(info.num_pending or 0), int(info.num_ack_pending or 0))
