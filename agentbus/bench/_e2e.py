"""Whole sessions, agentbus against a raw nats-py pipeline doing the same job in the same run.

The raw pipeline is the least a durable bus must do: submit (the task into a log stream, a work
item into a submit queue), a router (fetch, record the route, queue on the pool, ack), an agent
(fetch, each step written to the log and acked, the end written, ack). No fence, no read-back,
no KV. agentbus does the same sessions through its real router and agents, with a scripted
model, so only the bus work differs.

Figures, for each side and as ratios (agentbus / raw, or raw / agentbus for rates):
- submit → picked up and submit → completed, p50 and p99, one session at a time, the two sides
  taking turns every 10 sessions (both are up at once);
- sessions per second with N submitted at once (`agents` x `slots`);
- messages per session and per extra tool turn, counted on the server (`/varz` in_msgs:
  every request, publish and ack a client sends), idle traffic subtracted;
- resume: a session with a 1,000-event log to its first model call, next to a replay of that log;
- the session listing at 10, 100 and 1,000 sessions, next to one listing request;
- a read of an old session with 0, 10,000 and 50,000 sessions stored after it, next to one batched
  direct get asking for a thousand (which makes the server search everything stored after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api

import agentbus
from agentbus.bench import _reads
from agentbus.bench._watch import Ends, pct
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    ModelResponded,
    SessionCreated,
    SessionEnded,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
    WorkItem,
    encode,
)
from agentbus.models import ScriptedModel
from agentbus.server import NatsServer

TARGETS = {"messages_per_session": 15.0, "messages_per_tool_turn": 5.0, "pickup_p50_ms": 3.0}
_RAW = "rawe2e"
_POOL = "bench"


def _script(dir_: Path, tool_turns: int) -> ScriptedModel:
    """A scripted model: `tool_turns` read_file calls, then the answer."""

    def call(i: int) -> dict[str, Any]:
        block = {"type": "tool_use", "id": f"toolu_{i}", "name": "read_file", "input": {"path": "x.txt"}}
        return {"content": [block], "stop_reason": "tool_use", "usage": {}}

    done = {"content": [{"type": "text", "text": "done"}], "stop_reason": "end_turn", "usage": {}}
    path = dir_ / f"script-{tool_turns}.json"
    calls = [call(i) for i in range(tool_turns)]
    path.write_text(json.dumps({"responses": [*calls, done]}))
    return ScriptedModel(path)


def _varz(server: NatsServer) -> int:
    assert server.monitor_url is not None
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as resp:
        return int(json.load(resp)["in_msgs"])


# --- the raw pipeline ---------------------------------------------------------------------------


class _RawPipeline:
    """submit → router → work queue → agent, in raw nats-py, every write acked."""

    def __init__(self, nc: NATS, js: JetStreamContext, tool_turns: int) -> None:
        self.nc, self.js, self.tool_turns = nc, js, tool_turns
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    @staticmethod
    async def provision(js: JetStreamContext) -> None:
        streams = (
            (f"{_RAW.upper()}_SESSIONS", [f"{_RAW}.session.*.*"], api.RetentionPolicy.LIMITS),
            (f"{_RAW.upper()}_SUBMIT", [f"{_RAW}.submit"], api.RetentionPolicy.WORK_QUEUE),
            (f"{_RAW.upper()}_WORK", [f"{_RAW}.work.*"], api.RetentionPolicy.WORK_QUEUE),
        )
        for name, subjects, retention in streams:
            await js.add_stream(name=name, subjects=subjects, retention=retention, storage=api.StorageType.FILE)
        for stream, durable, filt in ((f"{_RAW.upper()}_SUBMIT", "router", f"{_RAW}.submit"),
                                      (f"{_RAW.upper()}_WORK", "pool", f"{_RAW}.work.{_POOL}")):  # fmt: skip
            await js.add_consumer(stream, api.ConsumerConfig(durable_name=durable, filter_subject=filt,
                                                             ack_policy=api.AckPolicy.EXPLICIT))  # fmt: skip

    async def start(self, agents: int, slots: int) -> None:
        router = await self.js.pull_subscribe_bind("router", stream=f"{_RAW.upper()}_SUBMIT")
        self._tasks.append(asyncio.create_task(self._loop(router, 16, self._route)))
        for _ in range(agents):
            pool = await self.js.pull_subscribe_bind("pool", stream=f"{_RAW.upper()}_WORK")
            self._tasks.append(asyncio.create_task(self._loop(pool, slots, self._work)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, sid: str, task: bytes) -> None:
        await self.js.publish(f"{_RAW}.session.{sid}.log", task, headers={"Nats-Msg-Id": f"{sid}:created"})
        await self.js.publish(f"{_RAW}.submit", encode(WorkItem(session_id=sid)), headers={"Nats-Msg-Id": sid})

    async def _loop(self, psub: Any, batch: int, handle: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        inflight: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            free = batch - len(inflight)
            if free <= 0:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await psub.fetch(free, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                task = asyncio.create_task(handle(msg))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight)

    async def _route(self, msg: Any) -> None:
        sid = json.loads(msg.data)["session_id"]
        routed = b'{"type":"routed","id":"routed","pool":"bench"}'
        await self.js.publish(f"{_RAW}.session.{sid}.log", routed, headers={"Nats-Msg-Id": f"{sid}:routed"})
        await self.js.publish(f"{_RAW}.work.{_POOL}", msg.data, headers={"Nats-Msg-Id": f"{sid}:new"})
        await msg.ack()

    async def _work(self, msg: Any) -> None:
        sid = json.loads(msg.data)["session_id"]
        log = f"{_RAW}.session.{sid}.log"
        for step in range(1, self.tool_turns + 2):
            response = encode(ModelResponded(id=f"step-{step}", step=step, model="scripted", content=()))
            await self.js.publish(log, response, headers={"Nats-Msg-Id": f"{sid}:step-{step}"})
            if step <= self.tool_turns:
                started = encode(ToolCallStarted(id=f"s{step}", step=step, tool_use_id=f"t{step}", name="read_file"))
                await self.js.publish(log, started, headers={"Nats-Msg-Id": f"{sid}:s{step}"})
                done = ToolCallCompleted(id=f"c{step}", step=step, tool_use_id=f"t{step}", name="read_file", output="x")
                await self.js.publish(log, encode(done), headers={"Nats-Msg-Id": f"{sid}:c{step}"})
        ended = encode(SessionEnded(id="ended", status="completed", result="done"))
        await self.js.publish(log, ended, headers={"Nats-Msg-Id": f"{sid}:ended"})
        await msg.ack()


# --- the measurements -----------------------------------------------------------------------------


class _Side:
    """One side of the comparison: how to submit, and what its ends and pickups look like."""

    def __init__(self, name: str, submit: Callable[[], Awaitable[str]], ends: Ends) -> None:
        self.name, self.submit, self.ends = name, submit, ends


async def _latency(sides: list[_Side], count: int, block: int = 10) -> dict[str, dict[str, float]]:
    """`count` sessions one at a time on each side, the sides taking turns every `block` sessions:
    this machine's speed drifts by tens of percent over seconds, and measured in turns both sides
    see the same machine. Within a block a side's
    sessions follow each other, so what one leaves running after its end (acks, settling) weighs
    on its own next session, as one side alone would; between blocks a pause lets it finish
    rather than land on the other side."""
    pickups: dict[str, list[float]] = {side.name: [] for side in sides}
    totals: dict[str, list[float]] = {side.name: [] for side in sides}
    for turn in range(-(-count // block)):
        for side in sides:
            await asyncio.sleep(0.02)
            for _ in range(min(block, count - turn * block)):
                started = time.perf_counter()
                sid = await side.submit()
                await side.ends.wait([sid])
                totals[side.name].append((side.ends.ended[sid] - started) * 1000)
                pickups[side.name].append((side.ends.picked.get(sid, side.ends.ended[sid]) - started) * 1000)
    return {name: _percentiles(pickups[name], totals[name]) for name in totals}


def _percentiles(pickups: list[float], totals: list[float]) -> dict[str, float]:
    return {
        "pickup_p50_ms": pct(pickups, 0.5), "pickup_p99_ms": pct(pickups, 0.99),
        "completed_p50_ms": pct(totals, 0.5), "completed_p99_ms": pct(totals, 0.99),
    }  # fmt: skip


async def _throughput(side: _Side, count: int) -> float:
    started = time.perf_counter()
    sids = await asyncio.gather(*(side.submit() for _ in range(count)))
    await side.ends.wait(sids, timeout=300)
    return count / (max(side.ends.ended[s] for s in sids) - started)


async def _messages(side: _Side, server: NatsServer, count: int, idle_s: float) -> float:
    """Messages clients sent per session (one at a time), idle traffic over the same time subtracted."""
    # idle traffic (long-polling fetches, heartbeats) comes in bursts: measure it over seconds
    idle_from, t0 = _varz(server), time.perf_counter()
    await asyncio.sleep(idle_s)
    idle_rate = (_varz(server) - idle_from) / (time.perf_counter() - t0)
    before, t1 = _varz(server), time.perf_counter()
    for _ in range(count):
        sid = await side.submit()
        await side.ends.wait([sid])
    spent = time.perf_counter() - t1
    return max((_varz(server) - before - idle_rate * spent) / count, 0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _new_id() -> str:
    return f"b{time.time_ns():x}{secrets.token_hex(3)}"


async def _run_pair(
    server: NatsServer, settings: Settings, tmp: Path, shape: tuple[int, int, int], n: int, idle_s: float
) -> dict[str, dict[str, float]]:
    """Both sides up at once, each on its own connection: latency measured in turns, then each
    side's throughput and messages on its own (the other side idle)."""
    tool_turns, agents, slots = shape
    conns = [await nats.connect(server.url, name=f"e2e-bench-{name}") for name in ("raw", "agentbus")]
    stops: list[Callable[[], Awaitable[None]]] = []
    try:
        raw, stop = await _raw_side(conns[0], conns[0].jetstream(), tool_turns, agents, slots)
        stops.append(stop)
        prefix = settings.prefix
        ours, stop = await _agentbus_side(conns[1], settings.with_(prefix=f"{prefix}a"), tmp, tool_turns, agents, slots)
        stops.append(stop)
        sides = [raw, ours]
        await _latency(sides, 20)  # warm up: the first sessions of a side are slower on both
        result = await _latency(sides, n)
        for side in sides:
            result[side.name]["sessions_per_s"] = await _throughput(side, n * 4)
        for side in sides:
            result[side.name]["messages_per_session"] = await _messages(side, server, n * 2, idle_s)
        return result
    finally:
        for stop in reversed(stops):
            await stop()
        for nc in conns:
            await nc.close()


async def _raw_side(nc: NATS, js: JetStreamContext, tool_turns: int, agents: int, slots: int) -> tuple[_Side, Any]:
    with_pickup = b'"type":"model_responded"'
    ends = Ends(lambda d: b'"type":"session_ended"' in d, lambda d: with_pickup in d)
    with contextlib.suppress(nats.js.errors.BadRequestError):  # a second round: the streams are there already
        await _RawPipeline.provision(js)
    await ends.watch(nc, f"{_RAW}.session.*.log")
    pipeline = _RawPipeline(nc, js, tool_turns)
    await pipeline.start(agents, slots)
    task = encode(SessionCreated(id="created", task=Task(session_id="x", prompt="bench")))

    async def submit() -> str:
        sid = _new_id()
        await pipeline.submit(sid, task)
        return sid

    return _Side("raw", submit, ends), pipeline.stop


async def _agentbus_side(
    nc: NATS, settings: Settings, tmp: Path, tool_turns: int, agents: int, slots: int
) -> tuple[_Side, Any]:
    from services.agent.worker import AgentConfig, AgentWorker
    from services.router.router import Router
    from services.router.routes import RouteTable

    # the same byte test as the raw side's watcher: the watcher is the bench's, and costs both sides alike
    ends = Ends(lambda d: b'"type":"session_ended"' in d, lambda d: b'"type":"session_claimed"' in d)
    model = _script(tmp, tool_turns)
    buses = [await Bus.connect(settings) for _ in range(agents + 2)]
    await buses[-1].provision(update=False)
    await ends.watch(nc, f"{settings.prefix}.session.*.log")
    router = Router(buses[0], RouteTable(default_pool=_POOL))
    config = AgentConfig(pool=_POOL, model=model.name, workdir=tmp / "work", concurrency=slots, tools=("read_file",))
    workers = [AgentWorker(b, config, model) for b in buses[1:-1]]
    runners = [asyncio.create_task(s.run()) for s in (router, *workers)]
    client = agentbus.Client(buses[-1])

    async def submit() -> str:
        return await client.submit("bench")  # the client makes the id, as a user's submit does

    async def stop() -> None:
        await asyncio.gather(*(s.shutdown() for s in (router, *workers)))
        await asyncio.gather(*runners, return_exceptions=True)
        for b in buses:
            await b.close()

    return _Side("agentbus", submit, ends), stop


async def run_e2e_bench(
    sessions: int = 100,
    *,
    agents: int = 1,
    slots: int = 16,
    store_dir: str | None = None,
    idle_s: float = 3.0,
    resume_events: int = 1000,
    listing: tuple[int, ...] = (10, 100, 1000),
    old_reads: tuple[int, ...] = (0, 10_000, 50_000),
) -> dict[str, Any]:
    """Both sides, one-step and three-step sessions, on a private server with monitoring; then
    resume of a long log and the session listing."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentbus-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # no authorization on either side: the bench weighs the bus work, and the raw side (and the
        # completion watcher) may then subscribe to anything
        server = NatsServer(store_dir=store_dir, monitor_port=_free_port(), auth=False)
        with server:
            settings = Settings(nats_url=server.url, prefix="e2e")
            out: dict[str, Any] = {"sessions": sessions, "agents": agents, "slots": slots}
            for turns, label in ((0, "one_step"), (2, "three_step")):
                pair = await _run_pair(
                    server, settings.with_(prefix=f"e2e{turns}"), tmp, (turns, agents, slots), sessions, idle_s
                )
                for name in ("raw", "agentbus"):
                    out.setdefault(name, {})[label] = pair[name]
            for name in ("raw", "agentbus"):
                one, three = out[name]["one_step"], out[name]["three_step"]
                out[name]["messages_per_tool_turn"] = (three["messages_per_session"] - one["messages_per_session"]) / 2
            out["ratio"] = _ratios(out["raw"], out["agentbus"])
            out["resume"] = await _reads.resume(server, settings.with_(prefix="e2er"), tmp, resume_events)
            out["listing"] = await _reads.listing(server, settings.with_(prefix="e2el"), listing)
            out["old_reads"] = await _reads.old_reads(server, settings.with_(prefix="e2eo"), old_reads)
    return out


def _ratios(raw: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    ratio: dict[str, float] = {}
    for label in ("one_step", "three_step"):
        for key, value in ours[label].items():
            base = raw[label][key]
            if not base:
                continue
            # rates: agentbus / raw (higher is better); times and counts: agentbus / raw (lower is better)
            ratio[f"{label}.{key}"] = round(value / base, 2)
    return ratio


def format_e2e_report(result: dict[str, Any]) -> str:
    lines = [f"{result['sessions']} sessions, {result['agents']} agent(s) x {result['slots']} slots", ""]
    keys = ["pickup_p50_ms", "pickup_p99_ms", "completed_p50_ms", "completed_p99_ms", "sessions_per_s",
            "messages_per_session"]  # fmt: skip
    for label in ("one_step", "three_step"):
        lines.append(f"{label:<12} {'raw':>10} {'agentbus':>10} {'ratio':>7}")
        for key in keys:
            raw, ours = result["raw"][label][key], result["agentbus"][label][key]
            ratio = result["ratio"].get(f"{label}.{key}", 0.0)
            lines.append(f"  {key:<22} {raw:>10.2f} {ours:>10.2f} {ratio:>7.2f}")
    lines.append(
        f"messages per extra tool turn: raw {result['raw']['messages_per_tool_turn']:.1f}, "
        f"agentbus {result['agentbus']['messages_per_tool_turn']:.1f}"
    )
    if resume := result.get("resume"):
        lines.append(
            f"resume of a {resume['events']}-record log: claimed {resume['claimed_ms']:.1f} ms, first model call"
            f" {resume['first_call_ms']:.1f} ms (target < 20), ended {resume['first_call_and_end_ms']:.1f} ms;"
            f" raw replay of the log {resume['raw_replay_ms']:.1f} ms"
        )
    for size, row in (result.get("listing") or {}).items():
        lines.append(
            f"listing {size:>5} sessions: {row['sessions_ms']:.1f} ms"
            f" (the subjects request alone {row['subjects_request_ms']:.1f} ms)"
        )
    for size, row in (result.get("old_reads") or {}).items():
        lines.append(
            f"read of an old session, {size:>6} sessions after it: whole {row['whole_ms']:.2f} ms, from its"
            f" 4th record {row['tail_ms']:.2f} ms (one batch asking for 1,000: {row['batch_1000_ms']:.2f} ms)"
        )
    return "\n".join(lines)


__all__ = ["TARGETS", "format_e2e_report", "run_e2e_bench"]
