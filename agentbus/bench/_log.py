"""Session-log benchmark: agentbus's `SessionLog` against raw nats-py, same server, same bytes.

One run starts its own `nats-server` (temp store, 127.0.0.1, free port) and measures,
interleaved and best of `repeats`:

| raw nats-py (own stream, same config) | agentbus (`client.log`)              |
|---------------------------------------|--------------------------------------|
| `js.publish`, one ack at a time       | `log.append(sid, event)`             |
| `publish_async`, <= 256 in flight     | `log.append_many(sid, N events)`     |
| ordered-consumer replay of N          | `log.tap(sid, follow=False)` over N  |
| ordered-consumer replay of N          | `log.read(sid)`: batched direct gets |

The raw side publishes the exact bytes agentbus encodes (so payload sizes match) with a
`Nats-Msg-Id` header, to a stream whose config is copied from agentbus's sessions stream.
It uses nats-py the fast way: `publish_async` without `wait_stall` (with it, Python 3.11's
`asyncio.wait_for` wraps every publish in a Task and each message goes out in its own
`send()`), and replay through a callback (the `sub.messages` iterator makes a Task and an
`asyncio.wait` per message). Those are the baselines agentbus is held to.

    .venv/bin/python -c 'import asyncio; from agentbus.bench import run_log_bench, format_report;
        print(format_report(asyncio.run(run_log_bench(5000))))'
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

import agentbus
from agentbus.auth import read_creds
from agentbus.config import Settings
from agentbus.messages import Event, HumanMessage, ToolCallCompleted, encode
from agentbus.server import NatsServer
from agentbus.session import SessionLog

PAYLOAD_BYTES = 200  # encoded size of every benchmark event
PIPELINE_DEPTH = 256  # acks in flight, raw and agentbus (`Bus.publish_many`) alike
WARMUP_EVENTS = 64
REPLAY_TIMEOUT_S = 120.0
# replay: the ordered consumer a tap starts with (the figure); read: batched direct gets, what
# agents and `show` read a session with (no consumer; each record comes with seven headers to parse)
TARGETS: dict[str, float] = {"append_sequential": 0.80, "append_batched": 0.80, "replay": 0.80, "read": 0.0}

_MSG_ID = "Nats-Msg-Id"
_RAW_ROOT = "rawbench"

Timed = Callable[[], Awaitable[int]]  # does the work, returns how many events it handled


# --- workload --------------------------------------------------------------------------------


def make_events(count: int, size: int = PAYLOAD_BYTES) -> list[Event]:
    """Alternating human messages and tool results, each padded to encode to exactly `size` bytes."""
    return [_padded(i, size) for i in range(count)]


def _padded(i: int, size: int) -> Event:
    def build(pad: str) -> Event:
        if i % 2:
            return ToolCallCompleted(
                id=f"tool-{i:08d}",
                ts=1.7e9 + i,
                step=i,
                tool_use_id=f"toolu_{i:012d}",
                name="bash",
                output=pad,
            )
        return HumanMessage(id=f"say-{i:08d}", ts=1.7e9 + i, text=pad, author="bench")

    bare = len(encode(build("")))
    if bare > size:
        raise ValueError(f"events cannot be as small as {size} bytes (the bare one is {bare})")
    return build("x" * (size - bare))


# --- raw nats-py -----------------------------------------------------------------------------


class _Raw:
    """Plain nats-py on its own stream: the baseline agentbus is held to."""

    def __init__(self, js: JetStreamContext, stream: str) -> None:
        self.js = js
        self.stream = stream

    def subject(self, sid: str) -> str:
        return f"{_RAW_ROOT}.session.{sid}.log"

    async def publish_sequential(self, sid: str, payloads: Sequence[bytes], ids: Sequence[str]) -> int:
        subject = self.subject(sid)
        for data, event_id in zip(payloads, ids, strict=True):
            await self.js.publish(subject, data, headers={_MSG_ID: f"{sid}:{event_id}"})
        return len(payloads)

    async def publish_pipelined(self, sid: str, payloads: Sequence[bytes], ids: Sequence[str]) -> int:
        subject = self.subject(sid)
        window: deque[asyncio.Future[api.PubAck]] = deque()
        for data, event_id in zip(payloads, ids, strict=True):
            if len(window) >= PIPELINE_DEPTH:
                await window.popleft()
            headers = {_MSG_ID: f"{sid}:{event_id}"}
            window.append(await self.js.publish_async(subject, data, headers=headers))
        for fut in window:
            await fut
        return len(payloads)

    async def replay(self, sid: str, expected: int) -> int:
        """nats-py's fast path: a callback (its `sub.messages` iterator makes a task per message)."""
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=30.0)
        done = asyncio.Event()
        count = 0

        async def on_msg(_: Msg) -> None:
            nonlocal count
            count += 1
            if count >= expected:
                done.set()

        filt = f"{_RAW_ROOT}.session.{sid}.*"
        sub = await self.js.subscribe(filt, stream=self.stream, ordered_consumer=True, config=config, cb=on_msg)
        try:
            await asyncio.wait_for(done.wait(), REPLAY_TIMEOUT_S)
        finally:
            await sub.unsubscribe()
        return count


# --- agentbus --------------------------------------------------------------------------------


async def _append_sequential(log: SessionLog, sid: str, events: Sequence[Event]) -> int:
    for event in events:
        await log.append(sid, event)
    return len(events)


async def _append_batched(log: SessionLog, sid: str, events: Sequence[Event]) -> int:
    # One call: the bus keeps PIPELINE_DEPTH acks in flight, the same window as the raw side.
    # (Calls of 256 each would drain the window at every call boundary: ~0.75 of raw.)
    await log.append_many(sid, events)
    return len(events)


async def _read(log: SessionLog, sid: str) -> int:
    return len(await log.read(sid))


async def _tap(log: SessionLog, sid: str) -> int:
    count = 0
    async for _ in log.tap(sid, start="start", follow=False):
        count += 1
    return count


# --- measuring -------------------------------------------------------------------------------


async def _rate(work: Timed, expected: int) -> float:
    """Events per second of one timed run; a short count means the run was wrong, not slow."""
    gc.collect()
    start = time.perf_counter()
    done = await work()
    elapsed = time.perf_counter() - start
    if done != expected:
        raise RuntimeError(f"benchmark handled {done} events, expected {expected}")
    return done / elapsed


@dataclass(frozen=True)
class _Workload:
    """The events both sides write: agentbus gets the Structs, raw nats-py their encoded bytes."""

    events: list[Event]
    payloads: list[bytes]
    ids: list[str]

    @classmethod
    def of(cls, count: int) -> _Workload:
        events = make_events(count)
        return cls(events, [encode(e) for e in events], [e.id for e in events])


@dataclass(frozen=True)
class _Op:
    """One measured operation: where its best rate goes, a warm-up, and the timed work."""

    best: dict[str, float]
    name: str
    warm: Timed
    work: Timed

    async def run(self, expected: int) -> None:
        await self.warm()
        rate = await _rate(self.work, expected)
        self.best[self.name] = max(rate, self.best.get(self.name, 0.0))


def _round(
    raw: _Raw, log: SessionLog, job: _Workload, warm: _Workload, rep: int, best: dict[str, dict[str, float]]
) -> list[tuple[_Op, _Op]]:
    """Pairs of comparable operations for repeat `rep`; every write goes to a fresh session.

    Fresh sessions matter: both sides set `Nats-Msg-Id`, so re-publishing an id would be
    deduplicated by the server (and look faster than a real write).
    """
    r, a = best["raw"], best["agentbus"]
    n_warm = len(warm.events)
    return [
        (
            _Op(
                r,
                "publish_sequential",
                partial(raw.publish_sequential, f"wseq{rep}", warm.payloads, warm.ids),
                partial(raw.publish_sequential, f"seq{rep}", job.payloads, job.ids),
            ),
            _Op(
                a,
                "append_sequential",
                partial(_append_sequential, log, f"wseq{rep}", warm.events),
                partial(_append_sequential, log, f"seq{rep}", job.events),
            ),
        ),
        (
            _Op(
                r,
                "publish_pipelined",
                partial(raw.publish_pipelined, f"wpipe{rep}", warm.payloads, warm.ids),
                partial(raw.publish_pipelined, f"pipe{rep}", job.payloads, job.ids),
            ),
            _Op(
                a,
                "append_batched",
                partial(_append_batched, log, f"wbatch{rep}", warm.events),
                partial(_append_batched, log, f"batch{rep}", job.events),
            ),
        ),
        (
            _Op(
                r,
                "replay",
                partial(raw.replay, "wseq0", n_warm),
                partial(raw.replay, "pipe0", len(job.events)),
            ),
            _Op(a, "replay", partial(_tap, log, "wseq0"), partial(_tap, log, "batch0")),
        ),
        (
            _Op(
                r,
                "replay",
                partial(raw.replay, "wseq0", n_warm),
                partial(raw.replay, "pipe0", len(job.events)),
            ),
            _Op(a, "read", partial(_read, log, "wseq0"), partial(_read, log, "batch0")),
        ),
    ]


async def _raw_stream(js: JetStreamContext, template: str, name: str) -> None:
    """A stream configured exactly like agentbus's sessions stream, on the raw subjects."""
    info = await js.stream_info(template)
    config = dataclasses.replace(info.config, name=name, subjects=[f"{_RAW_ROOT}.session.*.*"], metadata=None)
    await js.add_stream(config)


def _server_version(nc: NATS) -> str:
    version = nc.connected_server_version
    text = f"{version.major}.{version.minor}.{version.patch}"
    return f"{text}-{version.dev}" if version.dev else text


async def _measure(url: str, creds: str, events: int, repeats: int) -> dict[str, Any]:
    job, warm = _Workload.of(events), _Workload.of(WARMUP_EVENTS)
    run = secrets.token_hex(3)
    best: dict[str, dict[str, float]] = {"raw": {}, "agentbus": {}}
    settings = Settings(nats_url=url, prefix=f"bench{run}", creds=creds)
    async with agentbus.connect(settings=settings, name="agentbus-bench") as client:
        # both sides authenticate the same way (the server's admin, an nkey)
        admin = read_creds(creds)
        nc = await nats.connect(
            url, name="raw-bench", nkeys_seed_str=admin.seed, inbox_prefix=admin.identity.inbox_prefix
        )
        try:
            js = nc.jetstream(timeout=client.settings.publish_timeout_s)
            raw = _Raw(js, f"RAWBENCH{run}".upper())
            await _raw_stream(js, client.log.ns.sessions_stream, raw.stream)
            server = _server_version(nc)
            for rep in range(repeats):
                for raw_op, ab_op in _round(raw, client.log, job, warm, rep, best):
                    # Alternate who goes first, so neither side always runs on a warmer store.
                    for op in (raw_op, ab_op) if rep % 2 == 0 else (ab_op, raw_op):
                        await op.run(events)
        finally:
            await nc.close()
    return _result(events, repeats, best["raw"], best["agentbus"], server)


def _result(events: int, repeats: int, r: dict[str, float], a: dict[str, float], server: str) -> dict[str, Any]:
    return {
        "events": events,
        "payload_bytes": PAYLOAD_BYTES,
        "repeats": repeats,
        "raw": r,
        "agentbus": a,
        "ratio": {
            "append_sequential": a["append_sequential"] / r["publish_sequential"],
            "append_batched": a["append_batched"] / r["publish_pipelined"],
            "replay": a["replay"] / r["replay"],
            "read": a["read"] / r["replay"],
        },
        "server": server,
    }


async def run_log_bench(events: int = 5000, *, store_dir: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """Benchmark the session log against raw nats-py on a freshly started, private nats-server.

    Args:
        events: events per timed run (each operation handles this many).
        store_dir: JetStream store for the server; a temp directory (removed afterwards) if None.
        repeats: timed runs per operation, interleaved raw/agentbus; the best rate counts.

    Returns:
        `{"events", "payload_bytes", "repeats", "raw": {publish_sequential, publish_pipelined,
        replay}, "agentbus": {append_sequential, append_batched, replay, read}, "ratio":
        {append_sequential, append_batched, replay, read}, "server"}`, rates in events per second.
    """
    if events < 1 or repeats < 1:
        raise ValueError("events and repeats must be at least 1")
    server = NatsServer(store_dir=store_dir)
    await asyncio.to_thread(server.start)
    try:
        return await _measure(server.url, str(server.admin_creds), events, repeats)
    finally:
        await asyncio.to_thread(server.close)


# --- report ----------------------------------------------------------------------------------

_ROWS = (
    ("append sequential", "publish_sequential", "append_sequential"),
    ("append batched/pipelined", "publish_pipelined", "append_batched"),
    ("replay (ordered consumer)", "replay", "replay"),
    ("read (batched direct gets)", "replay", "read"),
)


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table: operation, raw/s, agentbus/s, ratio, target and whether it is met."""
    head = f"{'operation':<27} {'raw/s':>10} {'agentbus/s':>11} {'ratio':>6}  target"
    lines = [
        f"session log: {result['events']} events of {result.get('payload_bytes', '?')} bytes, "
        f"best of {result.get('repeats', '?')}, nats-server {result['server']}",
        head,
        "-" * (len(head) + 4),
    ]
    for label, raw_key, ab_key in _ROWS:
        if ab_key not in result["ratio"]:
            continue  # a result from before this row was measured
        ratio = result["ratio"][ab_key]
        target = TARGETS[ab_key]
        verdict = (f">= {target:.2f} " + ("✓" if ratio >= target else "✗")) if target else "(no target)"
        raw, ours = result["raw"][raw_key], result["agentbus"][ab_key]
        lines.append(f"{label:<27} {raw:>10,.0f} {ours:>11,.0f} {ratio:>6.2f}  {verdict}")
    return "\n".join(lines)


__all__ = ["TARGETS", "format_report", "make_events", "run_log_bench"]
