"""The caches that save requests, checked against what they stand in for, on a real nats-server.

- `HoldWatch`: an agent's view of its pool's hold reads the key only when the server said it changed.
- `SpendBatch`: many calls' costs reach the pool's total as one update; a failed or cancelled
  flush keeps them for the next.
- `statecache.listing`: the session listing trusts a cache entry only where the log bears it out.
- the router keeps the state cache current and collects fan-outs nobody told it about.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import Hold, Record, Routed, SessionEnded, StatusChanged
from agentbus.session import SessionLog
from agentbus.spend import _SETTLE_S, HoldWatch, SpendBatch, SpendLedger
from agentbus.state import SessionState, fold
from services.router import router as router_module
from services.router.router import Router
from services.router.routes import RouteTable
from tests.conftest import AsUser
from tests.helpers import POOL, until


class Calls:
    """A spy: wraps one bound method of a real object, counting (and recording) the calls it passes on."""

    def __init__(self, owner: object, name: str, *, before: Callable[[], None] | None = None) -> None:
        self.args: list[tuple[Any, ...]] = []
        self.failed = 0
        real: Callable[..., Awaitable[Any]] = getattr(owner, name)

        async def spy(*args: Any, **kwargs: Any) -> Any:
            self.args.append(args)
            if before is not None:
                before()
            try:
                return await real(*args, **kwargs)
            except Exception:
                self.failed += 1
                raise

        setattr(owner, name, spy)

    @property
    def count(self) -> int:
        return len(self.args)


@asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """A daemon (`run()`) for the block; it must still be running when the block ends."""
    task = asyncio.create_task(coro)
    try:
        yield task
        await asyncio.sleep(0)
        assert not task.done(), f"the daemon stopped on its own: {task}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def folded(records: list[Record], sid: str) -> SessionState:
    state = SessionState(session_id=sid)
    for rec in records:
        state = fold(state, rec)
    return state


# --- HoldWatch ------------------------------------------------------------------------------------


async def test_a_hold_watch_sees_a_hold_set_and_lifted_and_reads_the_key_only_after_a_change(
    client: agentbus.Client, as_user: AsUser
) -> None:
    supervisor = SpendLedger(client.bus)  # holds are set and lifted as the supervisor does
    async with await Bus.connect(as_user("ag", "agent", pools=[POOL])) as agent_bus:
        watch = HoldWatch(SpendLedger(agent_bus), POOL)
        reads = Calls(watch.ledger, "hold")
        async with running(watch.run()):
            await asyncio.wait_for(watch.live.wait(), 10)
            assert await watch.hold() is None
            for _ in range(20):
                assert await watch.hold() is None
            assert reads.count == 1, "no change since the first read: the watch answers without a request"

            await supervisor.set_hold(POOL, Hold(limit="pool_ceiling_usd", detail="over $1"))
            seen = await until(watch.hold, "the watch to see the hold", timeout=10)
            assert (seen.limit, seen.detail) == ("pool_ceiling_usd", "over $1")
            await _settles_then_is_cached(watch, reads, seen)

            await supervisor.clear_hold(POOL)
            await until(lambda: _lifted(watch), "the watch to see the hold lifted", timeout=10)
            await _settles_then_is_cached(watch, reads, None)


async def _lifted(watch: HoldWatch) -> bool:
    return await watch.hold() is None


async def _settles_then_is_cached(watch: HoldWatch, reads: Calls, want: Hold | None) -> None:
    # right after a change every check reads (a replica may not have stored the change yet)...
    before = reads.count
    for _ in range(3):
        assert await watch.hold() == want
    assert reads.count == before + 3, "a read right after a change must not be kept"
    # ...and once it has settled, one read is kept until the next change
    await asyncio.sleep(_SETTLE_S + 0.2)
    before = reads.count
    for _ in range(20):
        assert await watch.hold() == want
    assert reads.count == before + 1, "between changes the watch must answer without a request"


async def test_a_hold_watch_the_server_refuses_to_subscribe_reads_the_key_every_time(
    client: agentbus.Client, as_user: AsUser
) -> None:
    # an agent of another pool may read this pool's hold but not hear it change: it reads every time
    async with await Bus.connect(as_user("other", "agent", pools=["elsewhere"])) as agent_bus:
        watch = HoldWatch(SpendLedger(agent_bus), POOL)
        reads = Calls(watch.ledger, "hold")
        async with running(watch.run()):
            await asyncio.sleep(0.5)  # what the subscription's confirmation takes, and more
            assert not watch.live.is_set()
            assert await watch.hold() is None
            await SpendLedger(client.bus).set_hold(POOL, Hold(limit="fleet_ceiling_usd", detail="over"))
            held = await watch.hold()  # no waiting for a change nobody hears: the very next check
            assert held is not None and held.limit == "fleet_ceiling_usd"
            assert reads.count == 2


# --- SpendBatch -----------------------------------------------------------------------------------


async def _total(client: agentbus.Client, pool: str = POOL) -> tuple[float, int]:
    totals = (await SpendLedger(client.bus).snapshot())[0]
    return (totals[pool].usd, totals[pool].calls) if pool in totals else (0.0, 0)


async def test_costs_added_within_a_second_reach_the_total_as_one_update_with_their_sum(
    client: agentbus.Client, as_user: AsUser
) -> None:
    async with await Bus.connect(as_user("ag", "agent", pools=[POOL])) as agent_bus:
        batch = SpendBatch(SpendLedger(agent_bus), POOL)
        adds = Calls(batch.ledger, "add")
        async with running(batch.run()):
            for usd in (0.25, 0.5, 0.125):
                batch.add(usd)
                await asyncio.sleep(0.02)  # a call's worth of time: well within the second
            await until(lambda: _reached(client, 3), "the costs to reach the pool's total", timeout=10)
            assert await _total(client) == (0.875, 3)
            assert adds.args == [(POOL, 0.875, 3)], "three costs within a second: one update"

            batch.add(1.0)  # the loop goes on: a later cost is a later update
            await until(lambda: _reached(client, 4), "a later cost to reach the total", timeout=10)
        assert await _total(client) == (1.875, 4)
        assert adds.args == [(POOL, 0.875, 3), (POOL, 1.0, 1)]


async def _reached(client: agentbus.Client, calls: int) -> bool:
    return (await _total(client))[1] >= calls


async def test_costs_a_failed_flush_could_not_add_reach_the_total_on_the_next_one(
    client: agentbus.Client, as_user: AsUser, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Bus.connect(as_user("ag", "agent", pools=[POOL])) as agent_bus:
        ledger = SpendLedger(agent_bus)
        batch = SpendBatch(ledger, POOL, every_s=0.1)
        adds = Calls(ledger, "add")
        real_bucket = ledger.bucket
        ledger.bucket = f"{real_bucket}-missing"  # a bucket that is not there (and an agent may not make)
        with caplog.at_level(logging.WARNING, logger="agentbus.spend"):
            async with running(batch.run()) as loop:
                batch.add(0.25)
                batch.add(0.5)
                await until(lambda: _failed(adds, 2), "two flushes to fail", timeout=10)
                assert await _total(client) == (0.0, 0)
                batch.add(0.125)  # more comes in while the ledger is unreachable
                await until(lambda: _failed(adds, 3), "another flush to fail", timeout=10)
                ledger.bucket = real_bucket  # reachable again
                await until(lambda: _reached(client, 3), "the kept costs to reach the total", timeout=10)
                assert not loop.done()
        assert await _total(client) == (0.875, 3)
        assert adds.args[-1] == (POOL, 0.875, 3), "the kept costs go in one update with the new one"
        assert "spend not updated yet" in caplog.text


async def _failed(calls: Calls, n: int) -> bool:
    return calls.failed >= n


async def test_a_flush_cancelled_while_it_writes_keeps_the_batch(client: agentbus.Client, as_user: AsUser) -> None:
    async with await Bus.connect(as_user("ag", "agent", pools=[POOL])) as agent_bus:
        entered = asyncio.Event()
        batch = SpendBatch(SpendLedger(agent_bus), POOL)
        Calls(batch.ledger, "add", before=entered.set)
        batch.add(0.25)
        batch.add(0.5)
        flushing = asyncio.create_task(batch.flush())
        await entered.wait()  # the flush's first request is on its way
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
        assert await _total(client) == (0.0, 0)
        await batch.flush()
        assert await _total(client) == (0.75, 2)
        await batch.flush()  # nothing left: nothing counted twice
    assert await _total(client) == (0.75, 2)


async def test_stopping_the_batch_flushes_what_it_holds_and_says_what_it_could_not(
    client: agentbus.Client, as_user: AsUser, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Bus.connect(as_user("ag", "agent", pools=[POOL])) as agent_bus:
        batch = SpendBatch(SpendLedger(agent_bus), POOL, every_s=60)
        task = asyncio.create_task(batch.run())
        batch.add(0.25)
        await asyncio.sleep(0.1)  # the loop waits out its minute
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await _total(client) == (0.25, 1), "the final flush adds what came in since the last"

        failing = SpendBatch(SpendLedger(agent_bus), POOL, every_s=60)
        failing.ledger.bucket = f"{failing.ledger.bucket}-missing"
        task = asyncio.create_task(failing.run())
        failing.add(0.5)
        await asyncio.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="agentbus.spend"):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert "$0.5000 of 1 calls not added to its total" in caplog.text
    assert await _total(client) == (0.25, 1)


# --- the session listing and the state cache ------------------------------------------------------


async def _stream_facts(client: agentbus.Client, sid: str) -> tuple[int, int, SessionState]:
    """The stream's last sequence, how many records the session has, and its state folded from the log."""
    records = await client.log.read(sid)
    last = await client.bus.stream_last_seq(client.bus.ns.sessions_stream)
    return last, len(records), folded(records, sid)


async def _listed(reader: agentbus.Client) -> dict[str, SessionState]:
    return {s.session_id: s for s in await reader.sessions()}


async def _put_cache(client: agentbus.Client, sid: str, raw: bytes) -> None:
    await client.bus.kv_put(client.bus.ns.state_bucket, sid, raw)


async def _busy_session(client: agentbus.Client, prompt: str) -> str:
    sid = await client.submit(prompt, pool=POOL)
    await client.log.append(sid, StatusChanged(id="running-1", status="running", reason="picked up"))
    return sid


async def test_the_listing_trusts_current_entries_and_folds_a_session_with_none(
    client: agentbus.Client, as_user: AsUser
) -> None:
    cached, uncached = await _busy_session(client, "cached"), await _busy_session(client, "not cached")
    await client.state(cached)  # an admin's read writes the entry
    await client.bus.kv_delete(client.bus.ns.state_bucket, uncached)
    assert await client.bus.kv_get(client.bus.ns.state_bucket, uncached) is None
    # an observer of every session reads the cache but never writes it: what it lists is the listing's own
    async with agentbus.connect(settings=as_user("olga", "observer")) as reader:
        looks, reads = Calls(reader.log, "last_seq"), Calls(reader.log, "read")
        listed = await _listed(reader)
        assert listed[cached] == (await _stream_facts(client, cached))[2]
        assert listed[uncached] == (await _stream_facts(client, uncached))[2]
        assert (listed[uncached].status, listed[uncached].prompt) == ("running", "not cached")
        # the current entry came from the one batched read: no request about that session at all
        assert [a[0] for a in looks.args] == [uncached], "only the session without an entry is looked at"
        assert [a[0] for a in reads.args] == [uncached], "only the session without an entry is folded"


async def test_the_listing_refolds_a_session_whose_entry_folded_fewer_records_than_the_log_holds(
    client: agentbus.Client, as_user: AsUser
) -> None:
    sid = await _busy_session(client, "goes on after it was cached")
    stale = await client.state(sid)
    await client.log.append(sid, SessionEnded(id="ended", status="completed", result="done"))
    async with agentbus.connect(settings=as_user("olga", "observer")) as reader:
        listed = (await _listed(reader))[sid]
    last, count, truth = await _stream_facts(client, sid)
    assert stale.status == "running" and stale.last_seq < last
    assert listed == truth
    assert (listed.status, listed.result, listed.events) == ("completed", "done", count)


@pytest.mark.parametrize("forgery", ["garbage", "beyond the stream", "another session's", "fewer records"])
async def test_the_listing_believes_the_log_over_a_bad_cache_entry(
    client: agentbus.Client, as_user: AsUser, forgery: str
) -> None:
    sid = await _busy_session(client, "the log says running")
    other = await _busy_session(client, "a neighbour")
    last, count, truth = await _stream_facts(client, sid)
    lie = SessionState(session_id=sid, status="completed", result="forged", events=count, last_seq=last)
    raw = {
        "garbage": b"\xff\xfe not json {",
        # as many records as the log holds, but a sequence past the stream's last (an older stream's)
        "beyond the stream": msgspec.json.encode(msgspec.structs.replace(lie, last_seq=last + 1)),
        # right count and sequence, but it is the state of another session
        "another session's": msgspec.json.encode(msgspec.structs.replace(lie, session_id=other)),
        "fewer records": msgspec.json.encode(msgspec.structs.replace(lie, events=count - 1)),
    }[forgery]
    await _put_cache(client, sid, raw)
    async with agentbus.connect(settings=as_user("olga", "observer")) as reader:
        listed = await _listed(reader)
        assert listed[sid] == truth
        assert (listed[sid].status, listed[sid].result) == ("running", "")
        assert listed[other] == (await _stream_facts(client, other))[2]
    # an admin's listing (which may write the cache) repairs the entry as it lists the truth
    assert (await _listed(client))[sid] == truth
    repaired = await client.bus.kv_get(client.bus.ns.state_bucket, sid)
    assert repaired is not None and msgspec.json.decode(repaired[0], type=SessionState) == truth


async def test_the_listing_folds_every_session_when_the_cache_cannot_be_read(
    client: agentbus.Client, settings: Settings
) -> None:
    sids = [await _busy_session(client, f"session {i}") for i in range(3)]
    for sid in sids:
        await client.state(sid)
    truths = {sid: (await _stream_facts(client, sid))[2] for sid in sids}
    await client.bus.delete_stream(f"KV_{client.bus.ns.state_bucket}")  # the cache's stream is gone
    async with await Bus.connect(settings) as bus:  # a reader that has not bound the bucket yet
        listed = {s.session_id: s for s in await SessionLog(bus).states()}
    assert listed == truths


# --- the router keeps the cache current --------------------------------------------------------------


@asynccontextmanager
async def router(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Router]:
    """A router on its own connection, sweeping every half second instead of every KEEP_S."""
    monkeypatch.setattr(router_module, "KEEP_S", 0.5)
    async with await Bus.connect(settings, name="test-router") as bus:
        r = Router(bus, RouteTable(default_pool=POOL))
        task = asyncio.create_task(r.run())
        try:
            yield r
            assert not task.done(), "the router stopped on its own"
        finally:
            await r.shutdown()
            await task


async def _cached(client: agentbus.Client, sid: str) -> SessionState | None:
    got = await client.bus.kv_get(client.bus.ns.state_bucket, sid)
    return msgspec.json.decode(got[0], type=SessionState) if got and got[0] else None


async def test_a_running_router_brings_the_cache_of_a_session_whose_log_moved_on_up_to_date(
    client: agentbus.Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with router(settings, monkeypatch):
        sid = await client.submit("route me")  # no pool: the router's
        await until(lambda: _routed(client, sid), "the router to route the session", timeout=10)
        await until(lambda: _cached(client, sid), "the router to cache the session's state", timeout=10)
        ack = await client.log.append(sid, StatusChanged(id="running-1", status="running", reason="by hand"))

        async def current() -> bool:
            entry = await _cached(client, sid)
            return entry is not None and entry.last_seq == ack.seq

        await until(current, "the router to bring the cache up to date", timeout=10)
    entry = await _cached(client, sid)
    assert entry is not None and entry == (await _stream_facts(client, sid))[2]
    assert entry.status == "running"


async def _routed(client: agentbus.Client, sid: str) -> bool:
    return any(isinstance(r.event, Routed) for r in await client.log.read(sid))


async def test_a_running_router_collects_a_fan_out_whose_siblings_ended_without_telling_it(
    client: agentbus.Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with router(settings, monkeypatch):
        sid = await client.submit("two opinions", opinions=["nobody", "nobody"])

        async def fanned_out() -> tuple[str, ...]:
            children = (await client.log.state(sid)).children
            return children if len(children) == 2 and all([await client.log.exists(c) for c in children]) else ()

        children = await until(fanned_out, "the fan-out", timeout=10)
        # each sibling ends by a plain append: no child_result reaches the router's queue
        for i, child in enumerate(children):
            await client.log.append(child, SessionEnded(id="ended", status="completed", result=f"opinion {i}"))
        parent = await client.wait(sid, timeout=10)
    assert (parent.status, parent.reason) == ("completed", "2 of 2 opinions completed")
    assert "opinion 0" in parent.result and "opinion 1" in parent.result


async def test_a_bucket_write_nobody_answers_is_tried_again_as_through_a_failover(client: agentbus.Client) -> None:
    """A bucket's stream without a leader for a moment answers a write with no responders: nats-py
    raises its own error, which used to end the writer (a supervisor's tick, a state cache put)."""
    import nats.js.errors

    bus = client.bus
    bucket = bus.ns.state_bucket
    kv = await bus._bucket(bucket)
    calls: dict[str, int] = {}
    for name in ("put", "create", "update"):
        real = getattr(kv, name)

        async def leaderless_once(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            if calls[_name] == 1:
                raise nats.js.errors.NoStreamResponseError
            return await _real(*args, **kwargs)

        setattr(kv, name, leaderless_once)
    await bus.kv_put(bucket, "k1", b"v1")
    assert await bus.kv_put_if(bucket, "k2", b"v2", None)
    revision = (await bus.kv_get(bucket, "k2") or (b"", 0))[1]
    assert await bus.kv_put_if(bucket, "k2", b"v3", revision)
    assert calls == {"put": 2, "create": 2, "update": 2}
    assert [await bus.kv_get(bucket, k) for k in ("k1", "k2")] == [(b"v1", 1), (b"v3", revision + 1)]
