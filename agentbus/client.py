"""The public API for scripts and the CLI: submit, tap, say, show, wait, cancel.

async with agentbus.connect() as bus:
    sid = await bus.submit("write a haiku about queues", pool="writers")
    async for record in bus.tap(sid):
        print(record.seq, record.event)
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
from opentelemetry.trace import SpanKind

from agentbus import allowlist, tracing
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.errors import NoSuchSession, SessionUnsuccessful, Timeout, UsageError
from agentbus.messages import (
    Budget,
    CancelRequested,
    Hold,
    HumanMessage,
    PoolSpend,
    Record,
    ResumeRequested,
    Routed,
    ScaleReply,
    ScaleRequest,
    SessionCreated,
    Task,
    WorkerInfo,
    WorkItem,
    encode,
)
from agentbus.session import From, SessionLog
from agentbus.spend import SpendLedger
from agentbus.state import SessionState, fold
from agentbus.subjects import valid_token

_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford: no i, l, o, u


def new_session_id() -> str:
    """Time-ordered and unique: 10 characters of milliseconds, 6 random."""
    ms = int(time.time() * 1000)
    head = "".join(_B32[(ms >> (5 * i)) & 31] for i in reversed(range(10)))
    tail = "".join(secrets.choice(_B32) for _ in range(6))
    return head + tail


def new_event_id(kind: str) -> str:
    """An id for a one-off event (human message, cancel): unique, so never deduplicated away."""
    return f"{kind}-{time.time_ns():x}-{secrets.token_hex(3)}"


def default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER", "someone")


class Client:
    """A connected agentbus client; get one with `agentbus.connect()`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.log = SessionLog(bus)
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
    ) -> str:
        """Record a new session and queue it; returns the session id.

        With `pool` the task goes straight to that pool's queue; without, to the
        router. With `opinions` (a pool per sibling, "" for the router's choice) the
        router runs the task once per entry and records an aggregate in this session.
        Passing the same `session_id` again is safe: an existing session is not recorded
        twice, and is queued again only while no agent has claimed it.
        """
        sid = new_session_id() if session_id is None else session_id
        self._check_session_id(sid)
        with tracing.span("submit", kind=SpanKind.PRODUCER, session_id=sid, pool=pool):
            return await self._submit(
                sid, prompt, pool, criteria, checks, max_rounds, budget, tags, submitter, parent_session, depth, model,
                opinions,
            )  # fmt: skip

    async def _submit(
        self,
        sid: str,
        prompt: str,
        pool: str | None,
        criteria: Sequence[str],
        checks: Sequence[str],
        max_rounds: int,
        budget: Budget | None,
        tags: Sequence[str],
        submitter: str | None,
        parent_session: str | None,
        depth: int,
        model: str | None,
        opinions: Sequence[str],
    ) -> str:
        for name in (pool, *(p for p in opinions if p)):
            if name is not None and not valid_token(name):
                raise UsageError(f"pool name {name!r} must be 1-64 characters of letters, digits, '-' or '_'")
        if model and pool:
            await allowlist.check_submit(self.bus, pool, model)
        if opinions:
            # A fan-out parent runs nowhere itself: the router starts its siblings and aggregates them.
            pool = None
        size = len(prompt.encode("utf-8"))
        if size > self.settings.max_prompt_bytes:
            raise UsageError(
                f"prompt is {size} bytes; the limit is {self.settings.max_prompt_bytes} "
                "(set AGENTBUS_MAX_PROMPT_BYTES to change it)"
            )
        if not prompt.strip():
            raise UsageError("prompt is empty")
        if max_rounds < 1:
            raise UsageError("max_rounds must be at least 1")
        task = Task(
            session_id=sid,
            prompt=prompt,
            pool=pool,
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
        )
        if await self.log.exists(sid):
            # A repeated submit (a retry, a re-run delegate): never a second session_created, and
            # no second work item once an agent has the session.
            if (await self.log.state(sid)).status not in ("pending", "queued"):
                return sid
        else:
            created = SessionCreated(id="created", task=task, trace_id=tracing.current_trace_id())
            await self.log.append(sid, created, channel="control")  # the submitter's own channel
        if pool is None:
            await self.bus.publish(self.bus.ns.submissions(), encode(WorkItem(session_id=sid)), msg_id=sid)
        else:
            await self.log.append(sid, Routed(id="routed", pool=pool, rule="explicit"), channel="control")
            await self.bus.publish(self.bus.ns.work(pool), encode(WorkItem(session_id=sid)), msg_id=f"{sid}:new")
        return sid

    # --- steering -----------------------------------------------------------------------------

    async def say(self, session_id: str, text: str, *, author: str | None = None) -> int:
        """Append a human message to a session; returns its sequence in the log."""
        await self._require(session_id)
        if not text.strip():
            raise UsageError("message is empty")
        state = await self.log.state(session_id)
        if state.terminal:
            # Recording it would look like success to the person typing, but nothing would read it.
            raise UsageError(f"session {session_id} already ended {state.status}; nobody would read this")
        # `author` is a display name at most: readers show the authenticated sender (the subject's last token)
        event = HumanMessage(id=new_event_id("say"), text=text, author=author or "")
        return (await self.log.append(session_id, event, channel="input")).seq

    async def cancel(self, session_id: str, *, author: str | None = None, reason: str = "") -> int:
        """Ask the session to stop at its next step boundary (it ends `cancelled`)."""
        await self._require(session_id)
        event = CancelRequested(id=new_event_id("cancel"), author=author or "", reason=reason)
        return (await self.log.append(session_id, event, channel="input")).seq

    async def resume(self, session_id: str, *, budget: Budget | None = None, author: str | None = None) -> int:
        """Continue a paused session, with raised limits if given; it goes back on its pool's queue."""
        await self._require(session_id)
        state = await self.log.state(session_id)
        if state.status != "paused" or state.pool is None:
            raise UsageError(f"session {session_id} is {state.status}, not paused; only a paused session resumes")
        event = ResumeRequested(id=new_event_id("resume"), author=author or "", budget=budget or Budget())
        seq = (await self.log.append(session_id, event, channel="control")).seq  # raising a budget is a command
        item = WorkItem(session_id=session_id, reason="resume")
        await self.bus.publish(self.bus.ns.work(state.pool), encode(item), msg_id=f"{session_id}:resume:{seq}")
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
        """One state per session, oldest first; `status` filters."""
        ident = self.bus.identity
        if ident.lists_sessions:
            ids = await self.log.session_ids()
        else:  # a reader granted some sessions sees those, and learns of no others
            ids = [sid for sid in ident.sessions if await self.log.exists(sid)]
        states = [await self.log.state(sid) for sid in ids]
        return [s for s in states if status is None or s.status == status]

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
        """Every agent whose heartbeat is fresh, by pool then id."""
        values = await self.bus.kv_values(self.bus.ns.workers_bucket)
        infos = [msgspec.json.decode(v, type=WorkerInfo) for v in values.values()]
        return sorted(infos, key=lambda w: (w.pool, w.worker_id))

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
