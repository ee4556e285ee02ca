"""Server-sent event streams: one session's records (gapless across reconnects), and every visible session's state.

A session stream replays the session from its first record with one consumer that then follows
it live (no gap between history and live by construction, see `SessionLog.tap`). Each record goes
out as an SSE event whose `id:` is its stream sequence, so a browser that reconnects sends
`Last-Event-ID` and gets exactly the records after it: no gap, no duplicate. A fresh page asks for
only the last `tail` records; "load earlier" pages back through `/records`. The whole replay also
folds the state, the budget's limits and the chart, so every (re)connection ends its history with
a complete `summary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from agentbus.errors import AgentBusError
from agentbus.messages import DelegationCompleted, DelegationRequested, OpinionsAggregated, Record
from agentbus.state import SessionState, fold
from agentbus.web import reads
from agentbus.web.logins import Login
from agentbus.web.views import SessionSummary, record_view, state_view

PING_S = 15.0  # a comment this often keeps proxies from closing an idle stream, and finds dead clients
RETRY_MS = 1000  # how soon a browser reconnects after the stream ends
_DONE = object()
_FAMILY = (DelegationRequested, DelegationCompleted, OpinionsAggregated)  # records that change the tree
_encode = msgspec.json.Encoder().encode


def sse(event: str, data: Any, *, event_id: int | None = None) -> bytes:
    """One server-sent event; JSON never holds a raw newline, so `data` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return head.encode() + b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


async def _pump(source: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    try:
        async for item in source:
            await queue.put(item)
        await queue.put(_DONE)
    except AgentBusError as err:
        await queue.put(err)


async def merged(login: Login, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Items of `source`; None after every `PING_S` of silence; ends when the login's streams are dropped."""
    stop = asyncio.Event()
    login.streams.add(stop)
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    reader = asyncio.create_task(_pump(source, queue))
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            try:
                item = queue.get_nowait()  # while a replay runs ahead, no task per item
            except asyncio.QueueEmpty:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getter, stopped}, timeout=PING_S, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if stop.is_set():
                        return
                    yield None
                    continue
                item = getter.result()
            if item is _DONE:
                return
            if isinstance(item, AgentBusError):
                raise item
            yield item
    finally:
        login.streams.discard(stop)
        for task in (reader, stopped):
            task.cancel()
        for task in (reader, stopped):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]


async def session_stream(login: Login, session_id: str, *, after: int | None, tail: int) -> AsyncIterator[bytes]:
    """The session's records after `after` (or its last `tail`), a summary, then live records and states."""
    client = login.client
    ident, ns = login.identity, client.bus.ns
    yield f"retry: {RETRY_MS}\n\n".encode()
    state = SessionState(session_id=session_id)
    summary = SessionSummary()
    seqs: list[int] = []
    held: deque[Record] | list[Record] = deque(maxlen=tail) if after is None else []
    live = False
    try:
        last = await client.log.last_seq(session_id)  # a session this user may not read: refused here
        if last == 0:
            yield sse("gone", {"error": f"no session {session_id}"})
            return
        login.index(session_id, seqs)
        async for rec in merged(login, client.log.tap(session_id, start="start", follow=True)):
            if rec is None:
                yield b": ping\n\n"
                continue
            state = fold(state, rec)
            point = summary.add(rec)
            seqs.append(rec.seq)
            if live:
                yield sse("record", record_view(rec), event_id=rec.seq)
                yield sse("state", {"state": state_view(state, ident, ns), "gauges": summary.gauges(state),
                                    "point": point, "now": time.time()})  # fmt: skip
                if isinstance(rec.event, _FAMILY):
                    yield sse("tree", await reads.tree(client, session_id, state))
                continue
            if after is None or rec.seq > after:
                held.append(rec)
            if rec.seq >= last:
                live = True
                for out in _history(held, seqs, after, state, summary, login):
                    yield out
                yield sse("tree", await reads.tree(client, session_id, state))
    except AgentBusError as err:
        yield sse("failed", {"error": str(err)})


def _history(
    held: deque[Record] | list[Record],
    seqs: list[int],
    after: int | None,
    state: SessionState,
    summary: SessionSummary,
    login: Login,
) -> list[bytes]:
    first = held[0].seq if held else None
    earlier = sum(1 for s in seqs if first is not None and s < first) if after is None else 0
    ns = login.client.bus.ns
    out = [sse("history", {"first_seq": first, "earlier": earlier, "resumed_after": after})]
    out += [sse("record", record_view(r), event_id=r.seq) for r in held]
    out.append(sse("summary", {
        "state": state_view(state, login.identity, ns), "gauges": summary.gauges(state),
        "points": summary.points, "now": time.time(),
    }))  # fmt: skip
    return out


# --- every session's state -----------------------------------------------------------------------


async def watch_stream(login: Login, *, poll_s: float = 1.0) -> AsyncIterator[bytes]:
    """Every session this user may see: a `reset` with all their states, then a `states` batch per
    change. Users who may list every session follow one consumer over all of them (from where the
    listing stood, so nothing between the two is missed); users granted some sessions poll those."""
    client = login.client
    ident, ns = login.identity, client.bus.ns
    yield f"retry: {RETRY_MS}\n\n".encode()
    try:
        if ident.lists_sessions:
            start = await client.bus.stream_last_seq(ns.sessions_stream) + 1
            states = {s.session_id: s for s in await client.sessions()}
            source: AsyncIterator[Any] = _changes(login, start, states)
        else:
            states = {s.session_id: s for s in await client.sessions()}
            source = _polled(login, states, poll_s)
        yield sse("reset", {"states": [state_view(s, ident, ns) for s in states.values()], "now": time.time()})
        async for batch in merged(login, source):
            if batch is None:
                yield b": ping\n\n"
                continue
            views = [state_view(s, ident, ns) for s in batch]
            yield sse("states", {"states": views, "now": time.time()})
    except AgentBusError as err:
        yield sse("failed", {"error": str(err)})


async def _changes(login: Login, start: int, states: dict[str, SessionState]) -> AsyncIterator[list[SessionState]]:
    """The state of each session a record from `start` on changes, as it changes."""
    log = login.client.log
    async for rec in log.tap(None, start=start, follow=True):
        sid = rec.session_id
        if not sid:
            continue
        known = states.get(sid)
        # a session first seen now: its state up to now (this record and maybe later ones)
        states[sid] = await log.state(sid) if known is None else fold(known, rec)
        yield [states[sid]]


async def _polled(
    login: Login,
    states: dict[str, SessionState],
    poll_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[list[SessionState]]:
    """The granted sessions' states, re-read whenever their last sequence moves (one direct get each)."""
    log = login.client.log
    while True:
        await sleep(poll_s)
        changed = []
        for sid in login.identity.sessions:
            last = await log.last_seq(sid)
            known = states.get(sid)
            if last and (known is None or last != known.last_seq):
                states[sid] = await log.state(sid)
                changed.append(states[sid])
        if changed:
            yield changed
