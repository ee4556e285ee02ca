"""Work queues: durable pull consumers handing out `Job`s that their holder settles exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
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


class Queues(Provisioning):
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
