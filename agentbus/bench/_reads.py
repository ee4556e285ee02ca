"""Reads of the log at scale, next to raw nats-py: resume of a long session (claimed, then its
first model call) beside an ordered-consumer replay of the same records, the session listing
at several sizes beside one subjects request, and a read of an old session with ever more
sessions stored after it beside one batched direct get asking for a thousand."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

import agentbus
from agentbus.bench._watch import Ends, pct
from agentbus.bus import Bus, Outgoing
from agentbus.client import new_session_id
from agentbus.config import Settings
from agentbus.messages import (
    ModelResponded,
    SessionCreated,
    SessionEnded,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
    WorkItem,
)
from agentbus.models import ScriptedModel
from agentbus.server import NatsServer

_POOL = "bench"


async def resume(server: NatsServer, settings: Settings, tmp: Path, events: int, repeats: int = 5) -> dict[str, Any]:
    """A session whose log holds `events` records (tool turns) is queued; agentbus: until its agent
    recorded the claim (read, folded, rebuilt), until its first model call began (the guards
    checked), and until it ended (that call recorded, the end recorded); raw: one ordered-consumer
    replay of the same records. Medians of `repeats`."""
    from services.agent.worker import AgentConfig, AgentWorker

    turns = max((events - 2) // 3, 1)
    calls: list[dict[str, Any]] = [
        {"content": [{"type": "tool_use", "id": f"t{i}", "name": "read_file", "input": {"path": f"f{i}.txt"}}],
         "stop_reason": "tool_use", "usage": {}}
        for i in range(turns)
    ]  # fmt: skip
    done = {"content": [{"type": "text", "text": "done"}], "stop_reason": "end_turn", "usage": {}}
    script = tmp / "resume.json"
    script.write_text(json.dumps({"responses": [*calls, done]}))
    model = ScriptedModel(script)
    called: dict[str, float] = {}  # when each session's first model call began
    respond = model.respond

    async def timed(**kwargs: Any) -> Any:
        called.setdefault(kwargs["session_id"], time.perf_counter())
        return await respond(**kwargs)

    model.respond = timed  # type: ignore[method-assign]
    nc = await nats.connect(server.url, name="e2e-bench-resume")
    ends = Ends(lambda d: b'"type":"session_ended"' in d, lambda d: b'"type":"session_claimed"' in d)
    abus, cbus = await Bus.connect(settings), await Bus.connect(settings)
    await cbus.provision()
    await ends.watch(nc, f"{settings.prefix}.session.*.log")
    config = AgentConfig(pool=_POOL, model=model.name, workdir=tmp / "resume", tools=("read_file",),
                         runaway_steps=turns + 10, no_progress_turns=turns + 10)  # fmt: skip
    worker = AgentWorker(abus, config, model)
    runner = asyncio.create_task(worker.run())
    client = agentbus.Client(cbus)
    claims, calls_at, ended, replays = [], [], [], []
    try:
        for _ in range(repeats):
            sid = new_session_id()  # its records first, queued once they are all there
            task = Task(session_id=sid, prompt="resume bench", pool=_POOL)
            history: list[Any] = [SessionCreated(id="created", task=task)]
            for i in range(turns):
                use = calls[i]["content"]
                history += [
                    ModelResponded(id=f"step-{i + 1}", step=i + 1, model=model.name, content=tuple(use),
                                   stop_reason="tool_use"),
                    ToolCallStarted(id=f"start-t{i}", step=i + 1, tool_use_id=f"t{i}", name="read_file",
                                    input={"path": f"f{i}.txt"}),
                    ToolCallCompleted(id=f"done-t{i}", step=i + 1, tool_use_id=f"t{i}", name="read_file",
                                      output="no such file"),
                ]  # fmt: skip
            await client.log.append(sid, history[0], channel="control")
            await client.log.append_many(sid, history[1:])
            replays.append(await _raw_replay(nc, settings, sid))
            started = time.perf_counter()
            await client.queues.enqueue(WorkItem(session_id=sid), _POOL)
            await ends.wait([sid])
            claims.append((ends.picked[sid] - started) * 1000)
            calls_at.append((called[sid] - started) * 1000)
            ended.append((ends.ended[sid] - started) * 1000)
    finally:
        await worker.shutdown()
        await runner
        for b in (abus, cbus):
            await b.close()
        await nc.close()
    return {
        "events": 2 + 3 * turns,
        "raw_replay_ms": pct(replays, 0.5),
        "claimed_ms": pct(claims, 0.5),
        "first_call_ms": pct(calls_at, 0.5),
        "first_call_and_end_ms": pct(ended, 0.5),
    }


async def _raw_replay(nc: NATS, settings: Settings, sid: str) -> float:
    """One ordered consumer over the session's subjects, read to its last record."""
    js = nc.jetstream()
    stream = f"{settings.prefix.upper()}_SESSIONS"
    subject = f"{settings.prefix}.session.{sid}.>"
    started = time.perf_counter()
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            if msg.metadata.num_pending == 0:
                return (time.perf_counter() - started) * 1000
    finally:
        await sub.unsubscribe()


async def listing(server: NatsServer, settings: Settings, sizes: tuple[int, ...]) -> dict[str, Any]:
    """`sessions` (every session's state) at each size, next to the one request that lists the
    subjects (what any listing must at least do); medians of three, after a first listing that
    fills the state cache."""
    out: dict[str, Any] = {}
    async with await Bus.connect(settings) as bus:
        await bus.provision()
        client = agentbus.Client(bus)
        made = 0
        for size in sizes:
            while made < size:
                sid = new_session_id()
                created = SessionCreated(id="created", task=Task(session_id=sid, prompt="listed", pool=_POOL))
                await client.log.append(sid, created, channel="control")
                await client.log.append(sid, SessionEnded(id="ended", status="completed", result="r"))
                made += 1
            await client.sessions()
            ours, raw = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                states = await client.sessions()
                ours.append((time.perf_counter() - t0) * 1000)
                t1 = time.perf_counter()
                await bus.subject_counts(bus.ns.sessions_stream, bus.ns.sessions_all())
                raw.append((time.perf_counter() - t1) * 1000)
            assert len(states) == size, f"listed {len(states)} of {size} sessions"
            out[str(size)] = {"sessions_ms": pct(ours, 0.5), "subjects_request_ms": pct(raw, 0.5)}
    return out


async def old_reads(server: NatsServer, settings: Settings, sizes: tuple[int, ...]) -> dict[str, Any]:
    """A session of 7 records read whole and from its fourth record, with `size` sessions of three
    records each stored after it, next to one batched direct get asking for a thousand (what a read
    that does not know how many there are asks, and what agentbus asked until this stop). Medians
    of 30. A batch asked for more than is left makes the server search the rest of the stream."""
    nc = await nats.connect(server.url, name="e2e-bench-old-reads")
    out: dict[str, Any] = {}
    try:
        async with await Bus.connect(settings) as bus:
            await bus.provision()
            client = agentbus.Client(bus)
            sid = new_session_id()
            created = SessionCreated(id="created", task=Task(session_id=sid, prompt="an old session", pool=_POOL))
            await client.log.append(sid, created, channel="control")
            steps = [SessionEnded(id=f"e{i}", status="completed", result="r") for i in range(6)]
            seqs = [a.seq for a in await client.log.append_many(sid, steps)]
            subject = bus.ns.session_all(sid)
            made = 0
            for size in sizes:
                while made < size:
                    n = min(1000, size - made)
                    batch = [
                        Outgoing(bus.ns.session_log(f"after{made + i}"), b'{"type":"x"}', f"after{made + i}:{k}")
                        for i in range(n)
                        for k in range(3)
                    ]
                    await bus.publish_many(batch)
                    made += n
                whole, tail, raw = [], [], []
                for _ in range(30):
                    t0 = time.perf_counter()
                    assert len(await client.log.read(sid)) == 7
                    t1 = time.perf_counter()
                    assert len(await client.log.read(sid, from_seq=seqs[2])) == 4
                    t2 = time.perf_counter()
                    assert await _raw_batch(nc, bus.ns.sessions_stream, subject) == 7
                    t3 = time.perf_counter()
                    whole.append((t1 - t0) * 1000)
                    tail.append((t2 - t1) * 1000)
                    raw.append((t3 - t2) * 1000)
                out[str(size)] = {
                    "whole_ms": pct(whole, 0.5), "tail_ms": pct(tail, 0.5), "batch_1000_ms": pct(raw, 0.5),
                }  # fmt: skip
    finally:
        await nc.close()
    return out


async def _raw_batch(nc: NATS, stream: str, subject: str) -> int:
    """One batched direct get of up to 1,000 from sequence 1, in raw nats-py: how many came."""
    inbox = nc.new_inbox()
    got = 0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on(msg: Any) -> None:
        nonlocal got
        if msg.headers and "Status" in msg.headers and "Nats-Sequence" not in msg.headers:
            if not done.done():
                done.set_result(None)
        else:
            got += 1

    sub = await nc.subscribe(inbox, cb=on)
    try:
        request = json.dumps({"seq": 1, "next_by_subj": subject, "batch": 1000}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
        await asyncio.wait_for(done, 30)
    finally:
        await sub.unsubscribe()
    return got
