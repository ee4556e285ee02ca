"""The public API for scripts and the CLI: submit, tap, say, show, wait, cancel.

async with agentbus.connect() as bus:
    sid = await bus.submit("write a haiku about queues", pool="writers")
    async for record in bus.tap(sid):
        print(record.seq, record.event)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from opentelemetry.trace import SpanKind

from agentbus import allowlist, tracing
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.control import Control, new_event_id
from agentbus.errors import NoSuchSession, NotPermitted, SessionUnsuccessful, Timeout, UsageError
from agentbus.inbox import Inbox, InboxItem
from agentbus.messages import (
    BranchMerged,
    Budget,
    CancelRequested,
    Hold,
    MessageDelivered,
    PoolSpend,
    Record,
    ResumeRequested,
    ScaleReply,
    ScaleRequest,
    SupervisorInfo,
    Task,
    WorkerInfo,
    WorkItem,
    encode,
)
from agentbus.queues import WorkQueues
from agentbus.session import From, SessionLog
from agentbus.spend import SpendLedger
from agentbus.state import SessionState, fold
from agentbus.subjects import valid_token

logger = logging.getLogger("agentbus.client")
_Entry = TypeVar("_Entry", WorkerInfo, SupervisorInfo)
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford: no i, l, o, u


def new_session_id() -> str:
    """Time-ordered and unique: 10 characters of milliseconds, 6 random."""
    ms = int(time.time() * 1000)
    # 30 random bits from one read of the system's source (secrets.choice reads it once a character)
    rnd = int.from_bytes(secrets.token_bytes(4)) >> 2
    head = [_B32[(ms >> (5 * i)) & 31] for i in range(9, -1, -1)]
    return "".join(head + [_B32[(rnd >> (5 * i)) & 31] for i in range(6)])


@dataclass(frozen=True)
class PoolInfo:
    """One pool as `Client.pools()` sees it: who serves it and what waits for it."""

    name: str
    workers: tuple[str, ...] = ()  # live agents (fresh heartbeat)
    free_slots: int = 0  # sessions those agents could start now
    waiting: int = 0  # tasks no agent has taken
    in_flight: int = 0  # tasks an agent holds, not yet acked
    oldest_waiting_s: float | None = None  # age of the oldest task no agent has taken
    supervisors: tuple[str, ...] = ()  # supervisors that start workers for it

    @property
    def served(self) -> bool:
        """Whether anything will run its tasks: a live agent, or a supervisor that starts them."""
        return bool(self.workers or self.supervisors)


class Client:
    """A connected agentbus client; get one with `agentbus.connect()`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log = SessionLog(bus)
        self.queues = WorkQueues(self.log)
        self.control = Control(self.log)
        self.settings = bus.settings

    # --- submitting ---------------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        pool: str | None = None,
        criteria: Sequence[str] = (),
        checks: Sequence[str] = (),
        max_rounds: int = 3,
        budget: Budget | None = None,
        tags: Sequence[str] = (),
        submitter: str | None = None,
        parent_session: str | None = None,
        depth: int = 0,
        model: str | None = None,
        session_id: str | None = None,
        opinions: Sequence[str] = (),
        approve: Sequence[str] = (),
        base: str | None = None,
    ) -> str:
        """Record a new session and queue it; returns the session id.

        With `pool` the task goes straight to that pool's queue; without, to the
        router. With `opinions` (a pool per sibling, "" for the router's choice) the
        router runs the task once per entry and records an aggregate in this session.
        `approve` names tools whose calls wait for a person (on top of the pool's list).
        `base` (a pool on a repository) is the ref the session's branch starts from.
        Passing the same `session_id` again is safe: an existing session is not recorded
        twice, and is queued again only while no agent has claimed it.
        """
        sid = new_session_id() if session_id is None else session_id
        self._check_session_id(sid)
        task = Task(
            session_id=sid,
            prompt=prompt,
            # A fan-out parent runs nowhere itself: the router starts its siblings and aggregates them.
            pool=None if opinions else pool,
            criteria=tuple(criteria),
            checks=tuple(checks),
            max_rounds=max_rounds,
            budget=budget or Budget(),
            tags=tuple(tags),
            submitter=submitter or "",  # the authenticated submitter comes from the subject
            parent_session=parent_session,
            depth=depth,
            model=model,
            opinions=tuple(opinions),
            approve=tuple(approve),
            base=base or None,
        )
        self._check_task(task, pool)
        if model and pool:
            await allowlist.check_submit(self.bus, pool, model)
        if base and pool:  # issue 19: a base the pool's repository lacks is refused now, where it can be seen
            from agentbus.branches import check_base

            await asyncio.to_thread(check_base, await self.workers(), pool, base)
        with tracing.span("submit", kind=SpanKind.PRODUCER, session_id=sid, pool=pool):
            await self.queues.open_session(task, trace_id=tracing.current_trace_id(), new=session_id is None)
            return sid

    def _check_task(self, task: Task, pool: str | None) -> None:
        for name in (pool, *(p for p in task.opinions if p)):
            if name is not None and not valid_token(name):
                raise UsageError(f"pool name {name!r} must be 1-64 characters of letters, digits, '-' or '_'")
        size = len(task.prompt.encode("utf-8"))
        if size > self.settings.max_prompt_bytes:
            raise UsageError(
                f"prompt is {size} bytes; the limit is {self.settings.max_prompt_bytes} "
                "(set AGENTBUS_MAX_PROMPT_BYTES to change it)"
            )
        if not task.prompt.strip():
            raise UsageError("prompt is empty")
        if task.max_rounds < 1:
            raise UsageError("max_rounds must be at least 1")
        for tool in task.approve:
            if not tool or not tool.replace("_", "").replace("-", "").isalnum():
                raise UsageError(f"--approve names a tool: {tool!r} is not a tool name")
        if task.base is not None:
            from agentbus.repo import check_rev

            check_rev(task.base)

    # --- steering -----------------------------------------------------------------------------

    async def say(self, session_id: str, text: str, *, author: str | None = None, queue: bool = False) -> int:
        """Steer: a message the model reads at its next step; with `queue`, a follow-up delivered when
        the model would end its turn (on a completed session, the next turn). Returns its sequence."""
        await self._require(session_id)
        return await self.control.say(session_id, text, author=author or "", queue=queue)

    async def interrupt(self, session_id: str, text: str = "", *, author: str | None = None) -> int:
        """Stop the model call or tool in flight now; with `text` the session goes on with it, without
        it pauses (reason `interrupted`) until someone speaks to it or resumes it."""
        await self._require(session_id)
        return await self.control.interrupt(session_id, text, author=author or "")

    async def approve(
        self,
        session_id: str,
        call_id: str | None = None,
        *,
        deny: bool = False,
        reason: str = "",
        author: str | None = None,
    ) -> tuple[int, str]:
        """Approve (or `deny`) a tool call that waits for a person; the only waiting call if none is
        named. Returns (the decision's sequence, the call decided)."""
        await self._require(session_id)
        return await self.control.approve(session_id, call_id, author=author or "", deny=deny, reason=reason)

    async def wait_delivered(self, session_id: str, seq: int, *, timeout: float | None = None) -> MessageDelivered:
        """The receipt of the message at `seq`: which model request carried it. `SessionUnsuccessful`
        if the session ended first, `Timeout` after `timeout` seconds."""
        await self._require(session_id)
        try:
            return await asyncio.wait_for(self.control.delivered(session_id, seq), timeout)
        except TimeoutError as err:
            raise Timeout(f"message #{seq} of {session_id} not delivered after {timeout:g}s") from err

    async def inbox(self, *, follow: bool = False) -> AsyncIterator[InboxItem]:
        """The sessions that need a person, longest-waiting first; with `follow`, then every change
        (a session entering, or leaving with `present=False`) as it happens."""
        inbox = Inbox(self.log)
        if not follow:
            for item in await inbox.items():
                yield item
            return
        async for item in inbox.follow():
            yield item

    async def diff(self, session_id: str, *, stat: bool = False, repo: str | None = None) -> str:
        """What a session on a repository changed on its branch (git runs here: see `agentbus.branches`)."""
        from agentbus.branches import session_diff

        await self._require(session_id)
        return await session_diff(self.log, session_id, stat=stat, repo_path=repo)

    async def merge(self, session_id: str, *, into: str | None = None, repo: str | None = None) -> BranchMerged:
        """Merge an ended session's branch into its base (fast-forward, else a merge commit; a conflict
        raises `MergeConflict` and changes nothing), recorded in the session's log."""
        from agentbus.branches import merge_session

        await self._require(session_id)
        return await merge_session(self.log, session_id, into=into, repo_path=repo)

    async def dismiss(self, session_id: str, *, note: str = "", author: str | None = None) -> int:
        """Take a session out of every inbox until it next needs a person (someone has looked)."""
        await self._require(session_id)
        return await self.control.dismiss(session_id, author=author or "", note=note)

    async def cancel(self, session_id: str, *, author: str | None = None, reason: str = "") -> int:
        """Stop the session: one no agent has claimed is `cancelled` at once (the fold says so, and its
        queued work item is withdrawn); one an agent runs stops at its next step boundary, or now if it
        is parked. Returns the request's sequence."""
        await self._require(session_id)
        state = await self.log.state(session_id)
        if state.terminal:
            raise UsageError(f"session {session_id} already ended {state.status}; there is nothing to cancel")
        event = CancelRequested(id=new_event_id("cancel"), author=author or "", reason=reason)
        seq = (await self.log.append(session_id, event, channel="input")).seq
        after = await self.log.state(session_id)
        if after.status == "cancelled":  # nobody had claimed it
            try:
                await self.queues.settled(session_id, after.parent_session, status=after.status, turn=after.turn)
            except NotPermitted:  # a co-driver may not queue: the item stays, and the agent taking it tells
                return seq
            if after.pool is not None:
                with contextlib.suppress(NotPermitted):  # a role that may not: the next agent drops it
                    await self.queues.withdraw(session_id, after.pool)
        return seq

    async def resume(self, session_id: str, *, budget: Budget | None = None, author: str | None = None) -> int:
        """Continue a paused session, with raised limits if given; it goes back on its pool's queue."""
        await self._require(session_id)
        state = await self.log.state(session_id)
        if state.status != "paused" or state.pool is None:
            raise UsageError(f"session {session_id} is {state.status}, not paused; only a paused session resumes")
        event = ResumeRequested(id=new_event_id("resume"), author=author or "", budget=budget or Budget())
        seq = (await self.log.append(session_id, event, channel="control")).seq  # raising a budget is a command
        item = WorkItem(session_id=session_id, reason="resume", round=state.round)
        await self.queues.enqueue(item, state.pool, cause=str(seq))
        return seq

    # --- reading ------------------------------------------------------------------------------

    async def tap(
        self, session_id: str | None = None, *, start: From = "start", follow: bool = True
    ) -> AsyncIterator[Record]:
        """Every record of one session (or all, with None) from `start`, then live ones as they come."""
        if session_id is not None:
            await self._require(session_id)
        async for record in self.log.tap(session_id, start=start, follow=follow):
            yield record

    async def show(self, session_id: str) -> list[Record]:
        """The whole log of one session."""
        await self._require(session_id)
        return await self.log.read(session_id)

    async def state(self, session_id: str) -> SessionState:
        self._check_session_id(session_id)
        return await self.log.state(session_id)

    async def sessions(self, status: str | None = None) -> list[SessionState]:
        """One state per session, oldest first; `status` filters. A session whose state cannot be
        read is left out with a warning, so one bad entry never hides every other."""
        return [s for s in await self.log.states() if status is None or s.status == status]

    async def wait(
        self, session_id: str, *, timeout: float | None = None, raise_on_failure: bool = False
    ) -> SessionState:
        """Block until the session ends (or pauses); returns its final state.

        With `raise_on_failure`, an end other than `completed` raises `SessionUnsuccessful`.
        """
        await self._require(session_id)
        try:
            state = await asyncio.wait_for(self._until_settled(session_id), timeout)
        except TimeoutError as err:
            raise Timeout(f"session {session_id} still running after {timeout:g}s") from err
        if raise_on_failure and state.status != "completed":
            raise SessionUnsuccessful(session_id, state.status, state.reason)
        return state

    async def workers(self) -> list[WorkerInfo]:
        """Every agent whose heartbeat is fresh, by pool then id (an unreadable entry is skipped)."""
        infos = await self._registry(self.bus.ns.workers_bucket, WorkerInfo)
        return sorted(infos, key=lambda w: (w.pool, w.worker_id))

    async def _registry(self, bucket: str, kind: type[_Entry]) -> list[_Entry]:
        infos = []
        for key, raw in (await self.bus.kv_values(bucket)).items():
            try:
                infos.append(msgspec.json.decode(raw, type=kind))
            except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
                logger.warning("%s: unreadable entry %s skipped", bucket, key)
        return infos

    async def spend(self) -> tuple[dict[str, PoolSpend], dict[str, Hold]]:
        """Dollars spent per pool since its last reset, and the pools on hold (over a ceiling)."""
        return await SpendLedger(self.bus).snapshot()

    async def reset_spend(self, pool: str) -> PoolSpend:
        """Count the pool's spend from zero and lift its hold (set again while the fleet is over)."""
        if not valid_token(pool):
            raise UsageError(f"pool name {pool!r} must be letters, digits, '-' or '_'")
        return await SpendLedger(self.bus).reset(pool)

    async def request_workers(self, pool: str, count: int = 1, *, reason: str = "") -> ScaleReply:
        """Ask the supervisor for extra workers in `pool`; granted within the pool's max and the fleet cap."""
        req = ScaleRequest(pool=pool, count=count, reason=reason, requester=self.bus.user)
        reply = await self.bus.request(self.bus.ns.scale_requests(), encode(req))
        return msgspec.json.decode(reply, type=ScaleReply)

    async def supervisors(self) -> list[SupervisorInfo]:
        """Every supervisor whose heartbeat is fresh, with the pools it starts workers for (an unreadable
        entry is skipped)."""
        infos = await self._registry(self.bus.ns.supervisors_bucket, SupervisorInfo)
        return sorted(infos, key=lambda s: s.supervisor_id)

    async def serves(self, pool: str) -> bool:
        """Whether a live agent or a supervisor serves `pool` (two registry reads; see `pools` for more)."""
        return any(w.pool == pool for w in await self.workers()) or any(
            pool in s.pools for s in await self.supervisors()
        )

    async def pools(self) -> list[PoolInfo]:
        """Every pool anything knows of: a durable `pool-<name>` on the work stream, a task waiting
        on `work.<name>`, a live agent, or a supervisor's announcement; by name."""
        ns = self.bus.ns
        workers, supervisors = await self.workers(), await self.supervisors()
        consumers = {c.name.removeprefix("pool-"): c for c in await self.bus.consumer_states(ns.work_stream)
                     if c.name.startswith("pool-")}  # fmt: skip
        stored = {
            s.rsplit(".", 1)[-1]: n for s, n in (await self.bus.subject_counts(ns.work_stream, ns.work_all())).items()
        }
        names = set(consumers) | set(stored) | {w.pool for w in workers} | {p for s in supervisors for p in s.pools}
        out = []
        for name in sorted(n for n in names if valid_token(n)):
            mine = [w for w in workers if w.pool == name]
            consumer = consumers.get(name)
            # without a consumer nobody has taken anything: every stored task is waiting
            waiting, in_flight = (consumer.waiting, consumer.in_flight) if consumer else (stored.get(name, 0), 0)
            oldest = None
            if waiting:
                after = consumer.delivered_seq + 1 if consumer else 1
                first = await self.bus.next_stored(ns.work_stream, ns.work(name), after)
                first = first or await self.bus.next_stored(ns.work_stream, ns.work(name))  # a redelivery waits
                oldest = max(time.time() - first.time, 0.0) if first else None
            out.append(PoolInfo(
                name=name, workers=tuple(w.worker_id for w in mine),
                free_slots=sum(max(w.concurrency - len(w.sessions), 0) for w in mine),
                waiting=waiting, in_flight=in_flight, oldest_waiting_s=oldest,
                supervisors=tuple(s.supervisor_id for s in supervisors if name in s.pools),
            ))  # fmt: skip
        return out

    async def _until_settled(self, session_id: str) -> SessionState:
        # Start from the current state, not the first event: a session paused and resumed
        # earlier must not look settled at the old pause.
        state = await self.log.state(session_id)
        if state.terminal or state.status == "paused":
            return state
        async for record in self.log.tap(session_id, start=state.last_seq + 1, follow=True):
            state = fold(state, record)
            if state.terminal or state.status == "paused":
                return state
        return state  # pragma: no cover - tap only ends when the connection does

    async def _require(self, session_id: str) -> None:
        self._check_session_id(session_id)
        if not await self.log.exists(session_id):
            raise NoSuchSession(session_id)

    @staticmethod
    def _check_session_id(session_id: str) -> None:
        if not valid_token(session_id):
            raise UsageError(f"session id {session_id!r} must be 1-64 characters of letters, digits, '-' or '_'")


@asynccontextmanager
async def connect(
    url: str | None = None,
    *,
    prefix: str | None = None,
    settings: Settings | None = None,
    name: str = "agentbus-client",
) -> AsyncIterator[Client]:
    """Connect to NATS, provision the streams, and yield a `Client`; closes on exit."""
    settings = settings or Settings.from_env()
    settings = settings.with_(nats_url=url or settings.nats_url, prefix=prefix or settings.prefix)
    bus = await Bus.connect(settings, name=name)
    try:
        # Scripts and the CLI create what is missing but never reconfigure a running system's streams.
        await bus.provision(update=False)
        yield Client(bus)
    finally:
        await bus.close()
