"""Work queues: durable pull consumers handing out `Job`s that their holder settles exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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


class Job:
    """A message pulled from a work queue; the holder must settle it exactly once.

    Settling translates nats-py's errors: a failed ack, nak or term raises `BusError`.
    """

    __slots__ = ("_ask", "_msg", "attempt", "data", "headers", "seq", "stored_at", "subject")

    def __init__(self, msg: Msg, ask: Callable[[str, bytes, float], Awaitable[Any]] | None = None) -> None:
        self._msg = msg
        self._ask = ask  # the bus's request on its shared reply subscription (else nats-py's)
        meta = msg.metadata
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: Mapping[str, str] = dict(msg.headers or {})
        self.seq: int = meta.sequence.stream
        self.attempt: int = meta.num_delivered
        # when the stream stored it (seconds since the epoch; 0.0 if the server did not say)
        self.stored_at: float = meta.timestamp.timestamp() if meta.timestamp else 0.0

    @property
    def trace_context(self) -> Any:
        """The trace context of whoever published this job (start the work's span under it)."""
        return tracing.context_from(self.headers)

    async def ack(self, *, sync: bool = True) -> None:
        """Done: the server removes it. `sync` waits for the server to confirm, so a lost ack
        cannot redeliver finished work; skip it only where a redelivery is harmless."""
        try:
            if sync and self._ask is not None and self._msg.reply:
                await self._ask(self._msg.reply, b"+ACK", 5.0)  # what ack_sync sends, and its answer
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
        nc = self._queues._nc
        self._feed = _Pulls(nc.new_inbox())
        self._sub = await nc.subscribe(f"{self._feed.base}.*", future=self._feed)  # type: ignore[arg-type]

    async def take(self, free: int, timeout: float) -> list[Job]:
        """Up to `free` jobs (every slot free now), waiting up to `timeout` for the first."""
        feed = self._feed
        assert feed is not None, "start() first"
        if feed.gone:
            raise BusError(f"consumer {self.spec.durable}: {feed.gone}")
        if self._queues.reconnects != self._reconnects or (
            feed.open and time.monotonic() - feed.heard > 3 * _PULL_HEARTBEAT_S
        ):
            # requests made before a reconnect, or gone silent, may be lost: ask again
            self._reconnects = self._queues.reconnects
            feed.open.clear()
        want = free - len(feed.msgs) - sum(feed.open.values())
        if want > 0 and (want >= self._threshold or not feed.open) and time.monotonic() >= feed.refused_until:
            await self._request(feed, want)
        if not feed.msgs:
            await feed.wait(timeout)
        jobs: list[Job] = []
        while feed.msgs and len(jobs) < free:
            jobs.append(Job(feed.msgs.popleft(), self._queues.ask))
        return jobs

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
            feed.open.pop(reply, None)
            logger.info("pull from %s: %s; trying again", self.spec.durable, description(err))
        self.requests += 1

    def left(self) -> list[Job]:
        """Delivered and not taken (more than the free slots, after a reconnect): the caller gives them back."""
        feed = self._feed
        if feed is None:
            return []
        jobs = [Job(m, self._queues.ask) for m in feed.msgs]
        feed.msgs.clear()
        return jobs

    async def close(self) -> None:
        # the server drops waiting requests whose reply subject nobody listens to any more
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


class _Pulls:
    """The deliveries and status answers to a `Standing`'s requests: a status comes on the request's
    reply subject, a message on its own subject."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.open: dict[str, int] = {}  # request -> messages it may still deliver
        self.msgs: collections.deque[Msg] = collections.deque()
        self.heard = time.monotonic()
        self.gone = ""  # why the consumer cannot deliver any more (deleted)
        self.refused_until = 0.0  # no new request before this (monotonic), after a refusal
        self._n = 0
        self._waiter: asyncio.Future[None] | None = None

    def open_request(self, batch: int) -> str:
        self._n += 1
        reply = f"{self.base}.{self._n:x}"
        self.open[reply] = batch
        self.heard = time.monotonic()
        return reply

    def cancelled(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:  # a message: it keeps its own subject, so count it against the oldest request
            # (the server fills waiting requests in the order they came)
            for oldest in self.open:
                if self.open[oldest] > 1:
                    self.open[oldest] -= 1
                else:
                    del self.open[oldest]
                break
            self.msgs.append(msg)
        elif status == "100":  # idle heartbeat: the request still waits
            return
        else:  # 408 expired, 404 nothing (no_wait), 409 (leader moved, too many waiting, deleted)
            self.open.pop(msg.subject, None)
            what = (msg.headers or {}).get("Description", "")
            if status == "409" and "deleted" in what.lower():
                self.gone = f"deleted on the server ({what})"
            elif status == "409":  # asking again at once would be refused again: not for a moment
                logger.info("pull request on %s ended: %s", msg.subject, what)
                self.refused_until = time.monotonic() + _REFUSED_PAUSE_S
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

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
