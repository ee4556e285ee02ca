"""What every long-running agentbus process shares: a lifecycle, supervised tasks, and one consume loop.

A service is never alive and idle. Its loops run as supervised tasks: when one fails, the
others are told to drain, the service stops, and the error is raised from `run()` (the
process exits and its supervisor replaces it) — the shape of Temporal's worker. Inside a
consume loop, one message can never stop the loop: the handler's outcome decides what
happens to the message, and anything unexpected is retried with backoff until the
message's deliveries run out, then given up with a recorded reason.

Handlers raise their ack decision (FastStream's `AckMessage`/`NackMessage`/`RejectMessage`):
returning acks, `Retry` naks after a delay, `Reject` drops bad input for good with the
reason recorded, `HandBack` re-queues a fresh message and acks this one, `Settled` acks one the
handler has already re-queued itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.trace import SpanKind

from agentbus import tracing
from agentbus.bus import Bus, Job, Standing
from agentbus.errors import AgentBusError
from agentbus.subjects import ConsumerSpec

logger = logging.getLogger("agentbus.service")

_BACKOFF_MAX_S = 30.0
_DAEMON_STOP_S = 5.0  # what a stopping service gives its background work to finish its clean-up


class Retry(Exception):
    """Not now: give the message back, to be delivered again after `delay` seconds (a delivery is spent)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry")
        self.delay = delay
        self.reason = reason


class Reject(Exception):
    """Bad input: never deliver it again; `reason` is recorded where people look."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Settled(Exception):
    """Taken care of already (the handler queued whatever follows itself): ack it and do nothing more."""


class HandBack(Exception):
    """This worker stops here (draining, or the work waits for something): queue a fresh message and
    ack this one, so the hand-over costs no delivery."""


class Settlement(Protocol):
    """How a consumer records the outcomes its loop cannot handle alone."""

    async def rejected(self, job: Job, reason: str) -> None:
        """Bad input, about to be terminated: record why (e.g. `input_rejected` in the session)."""

    async def gave_up(self, job: Job, reason: str) -> None:
        """The last delivery failed too: record the failure (e.g. end the session `failed`)."""

    async def handed_back(self, job: Job) -> None:
        """Queue a fresh message for the same work (it is acked right after)."""


class LogOnly:
    """Settlement for messages that name no session (advisories, log events): a log line is the record."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def rejected(self, job: Job, reason: str) -> None:
        logger.warning("%s: dropped message %d on %s: %s", self.what, job.seq, job.subject, reason)

    async def gave_up(self, job: Job, reason: str) -> None:
        logger.error("%s: gave up on message %d on %s: %s", self.what, job.seq, job.subject, reason)

    async def handed_back(self, job: Job) -> None:
        raise AgentBusError(f"{self.what}: nothing to hand back to")


Handler = Callable[[Job], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Consumer:
    """One durable pull consumer and what to do with its messages.

    Args:
        spec: the durable (its `max_deliver` bounds the retries).
        handle: called once per message; returns to ack, or raises an ack decision.
        settle: records rejections, give-ups and hand-backs.
        concurrency: messages handled at once.
        span: name of the consumer span each message is handled in (None: no span here).
        keep_alive: send in-progress acks while the handler runs (for work longer than the ack wait).
        sync_ack: wait for the server to confirm each ack (skip only where a redelivery is harmless).
    """

    spec: ConsumerSpec
    handle: Handler
    settle: Settlement
    concurrency: int = 1
    span: str | None = None
    keep_alive: bool = False
    sync_ack: bool = True


async def consume(bus: Bus, consumer: Consumer, draining: asyncio.Event, *, fetch_timeout: float = 1.0) -> None:
    """Fetch → handle → settle, until `draining` is set; then waits for the messages in hand.

    Raises only when the consumer itself cannot work (cannot be made, the connection closed);
    a message that cannot be handled never stops the loop.
    """
    standing = await bus.standing(consumer.spec, consumer.concurrency)
    inflight: set[asyncio.Task[None]] = set()
    try:
        while not draining.is_set():
            free = consumer.concurrency - len(inflight)
            if free <= 0:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            jobs = await standing.take(free, timeout=fetch_timeout)
            if draining.is_set():
                await _give_back(standing, jobs)  # taken after the drain began
                break
            for job in jobs:
                task = asyncio.create_task(_one(consumer, job))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
    finally:
        await _give_back(standing, [])
        if inflight:
            await asyncio.wait(inflight)


async def _give_back(standing: Standing, jobs: list[Job]) -> None:
    """Stop asking (the server then delivers nothing more here), and hand back what arrived unstarted:
    with no request of ours left open, a nak cannot come straight back to this worker."""
    await standing.close()
    for job in [*jobs, *standing.left()]:
        with contextlib.suppress(AgentBusError):
            await job.nak()


async def _one(consumer: Consumer, job: Job) -> None:
    """Handle one message and settle it; never raises (a failure to settle is logged: the server redelivers)."""
    try:
        await _handled(consumer, job)
    except Exception:
        logger.exception("%s: message %d on %s could not be settled", consumer.spec.durable, job.seq, job.subject)


async def _handled(consumer: Consumer, job: Job) -> None:
    try:
        if consumer.span is None:
            await _run(consumer, job)
        else:
            attrs = {**tracing.messaging_attrs(job.subject, operation="process"), "agentbus.attempt": job.attempt}
            with tracing.span(consumer.span, kind=SpanKind.CONSUMER, parent=job.trace_context, attributes=attrs):
                await _run(consumer, job)
    except Retry as decision:
        await job.nak(delay=decision.delay)
        return
    except Reject as decision:
        await consumer.settle.rejected(job, decision.reason)
        await job.term()
        return
    except HandBack:
        await consumer.settle.handed_back(job)
    except Settled:
        pass
    except Exception as err:
        await _failed(consumer, job, err)
        return
    await job.ack(sync=consumer.sync_ack)


async def _run(consumer: Consumer, job: Job) -> None:
    if not consumer.keep_alive:
        await consumer.handle(job)
        return
    async with job.kept_alive(consumer.spec.ack_wait_s / 3):
        await consumer.handle(job)


async def _failed(consumer: Consumer, job: Job, err: Exception) -> None:
    """Unexpected: retried with backoff; once the deliveries are spent, given up with the reason."""
    what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    last = consumer.spec.max_deliver > 0 and job.attempt >= consumer.spec.max_deliver
    if isinstance(err, AgentBusError):
        logger.warning("%s: message %d (attempt %d): %s", consumer.spec.durable, job.seq, job.attempt, what)
    else:  # a bug, or a library error nobody translated: the traceback is worth having
        logger.error("%s: message %d (attempt %d) failed", consumer.spec.durable, job.seq, job.attempt, exc_info=err)
    if last:
        await consumer.settle.gave_up(job, f"gave up after {job.attempt} attempts; last error: {what}")
        await job.term()
    else:
        await job.nak(delay=backoff(job.attempt))


def backoff(attempt: int) -> float:
    """Seconds before delivery `attempt + 1`: 2, 4, 8, 16, then 30."""
    return min(2.0**attempt, _BACKOFF_MAX_S)


class Service:
    """`run()` until `shutdown()` (safe to call twice; it waits for `run()` to return).

    A subclass implements `_serve()`, which returns once `_draining` is set and its work is
    handed back or finished; it runs its loops with `_supervise`, so a loop that fails stops
    the service instead of leaving it alive and idle.
    """

    def __init__(self) -> None:
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            self._stopped.set()  # even when start-up failed, so shutdown() never waits forever

    async def shutdown(self) -> None:
        """Stop taking work; returns when `run()` has returned."""
        self._draining.set()
        await self._stopped.wait()

    async def _serve(self) -> None:
        raise NotImplementedError

    async def _supervise(
        self,
        loops: list[Coroutine[Any, Any, None]],
        daemons: list[Coroutine[Any, Any, None]] = [],  # noqa: B006 - never mutated
    ) -> None:
        """Run `loops` (which return once `_draining` is set) and `daemons` (background work that
        runs until cancelled). The first failure of any drains the rest, then is raised."""
        loop_tasks = [asyncio.create_task(c) for c in loops]
        daemon_tasks = {asyncio.create_task(c) for c in daemons}
        everything = [*loop_tasks, *daemon_tasks]
        try:
            pending = set(everything)
            while not all(t.done() for t in loop_tasks):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t in daemon_tasks or t.exception() is not None for t in done if not t.cancelled()):
                    # one part is gone: the others stop taking work and finish what they hold
                    self._draining.set()
            for task in daemon_tasks:
                task.cancel()
            # bounded: a daemon stuck in its clean-up must not keep the service from stopping
            _, stuck = await asyncio.wait(daemon_tasks, timeout=_DAEMON_STOP_S) if daemon_tasks else (set(), set())
            for task in stuck:
                logger.warning("%s did not stop within %.0fs; left behind", task.get_coro(), _DAEMON_STOP_S)
            errors = [t.exception() for t in everything if t.done() and not t.cancelled() and t.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]
        finally:
            for task in everything:
                task.cancel()


def freeze_heap() -> None:
    """Called once by a service's process when it is up, never by the library: what the process
    made to start (modules, the SDKs and their tables; about 200,000 objects once the Anthropic SDK
    is imported) lives as long as the process, so the cyclic collector stops scanning it. A full
    collection over that heap took about 60 ms on the 2-core machine, and it stalls every session
    of the process while it runs; it comes round once enough new objects survived, as when an
    agent resumes a long log. The garbage of starting is collected first, not kept."""
    gc.collect()
    gc.freeze()


async def serve_until_signalled(service: Service, bus: Bus) -> None:
    """A service's process: SIGINT or SIGTERM drains it; the connection closes after it stops."""
    freeze_heap()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.shutdown()))
    try:
        await service.run()
    finally:
        await bus.close()
