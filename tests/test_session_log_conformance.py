"""The log conformance suite: what every session-log backend must do, run against a real nats-server.

Order, idempotent appends, unknown sessions, isolation, replay from a sequence,
the history-to-live switch of a tap, the writer fence, crash survival, and the
state fold on top of it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    Event,
    HumanMessage,
    ModelResponded,
    Record,
    SessionClaimed,
    StatusChanged,
    ToolCallCompleted,
    Usage,
)
from agentbus.server import NatsServer
from agentbus.session import Channel, SessionLog, SessionWriter
from agentbus.state import SessionState, fold
from tests.helpers import raw_connect

COLLECT_TIMEOUT_S = 10.0
TS = 1_700_000_000.5


def step(i: int, tag: str = "step") -> ToolCallCompleted:
    """A log-channel event with a deterministic id, as an agent would write it."""
    return ToolCallCompleted(
        id=f"{tag}-{i}", ts=TS + i, step=i, tool_use_id=f"tu-{tag}-{i}", name="echo", output=str(i)
    )


END = ToolCallCompleted(id="end", ts=TS, step=0, tool_use_id="tu-end", name="echo", output="end")


def note(i: int) -> HumanMessage:
    """An input-channel event, as a person would write it."""
    return HumanMessage(id=f"note-{i}", ts=TS + i, text=f"note {i}", author="tester")


@pytest.fixture
def log(client: agentbus.Client) -> SessionLog:
    return client.log


async def collect(
    records: AsyncIterator[Record],
    count: int,
    *,
    until: str | None = None,
    keep_open: bool = False,
    timeout: float = COLLECT_TIMEOUT_S,
) -> list[Record]:
    """The next `count` records of a (following) tap, or fewer if the event with id `until` comes first.

    Fails after `timeout` with what arrived. The tap is closed afterwards unless
    `keep_open`, in which case the caller closes it.
    """
    out: list[Record] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count and not (until and out and _ids(out[-1:]) == [until]):
                out.append(await anext(records))
    except TimeoutError:
        pytest.fail(f"tap gave {len(out)} of {count} records in {timeout}s; last seq {_seqs(out)[-1:]}")
    except StopAsyncIteration:
        pytest.fail(f"tap ended after {len(out)} of {count} records")
    finally:
        if not keep_open:
            await close(records)
    return out


async def drain(records: AsyncIterator[Record]) -> list[Record]:
    """Everything a non-following tap yields."""
    try:
        async with asyncio.timeout(COLLECT_TIMEOUT_S):
            return [rec async for rec in records]
    finally:
        await close(records)


async def close(records: AsyncIterator[Record]) -> None:
    """Close a tap now (it is an async generator), so its consumer goes away at once."""
    aclose = getattr(records, "aclose", None)
    if aclose is not None:
        await aclose()


def _seqs(records: Sequence[Record]) -> list[int]:
    return [r.seq for r in records]


def _ids(records: Sequence[Record]) -> list[str]:
    return [getattr(r.event, "id", "") for r in records]


def _strictly_increasing(values: Sequence[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


async def wait_for(condition: asyncio.Event, timeout: float = COLLECT_TIMEOUT_S) -> None:
    """Wait for an event with a deadline (no sleeps for synchronisation)."""
    async with asyncio.timeout(timeout):
        await condition.wait()


# --- append and read ------------------------------------------------------------------------------


async def test_appended_events_read_back_in_append_order_with_their_sequences(log: SessionLog) -> None:
    single = [await log.append("s1", step(i)) for i in range(10)]
    piped = await log.append_many("s1", [step(i) for i in range(10, 40)])

    records = await log.read("s1")

    assert _ids(records) == [f"step-{i}" for i in range(40)]
    assert [r.event for r in records] == [step(i) for i in range(40)]
    assert _seqs(records) == [ack.seq for ack in [*single, *piped]]
    assert _strictly_increasing(_seqs(records))
    assert {(r.session_id, r.channel) for r in records} == {("s1", "log")}
    assert not any(ack.duplicate for ack in [*single, *piped])


async def test_both_channels_of_a_session_read_back_in_stream_order(log: SessionLog) -> None:
    channels: list[Channel] = ["log", "input", "input", "log", "input", "log"]
    acks = [await log.append("s1", step(i) if ch == "log" else note(i), channel=ch) for i, ch in enumerate(channels)]

    records = await log.read("s1")

    assert [r.channel for r in records] == channels
    assert _seqs(records) == [a.seq for a in acks]


async def test_re_appending_the_same_event_id_is_a_duplicate_stored_once(log: SessionLog) -> None:
    await log.append("s1", step(0))
    first = await log.append("s1", step(1))
    await log.append("s1", step(2))

    again = await log.append("s1", step(1))
    piped_again = await log.append_many("s1", [step(0), step(1), step(2)])

    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert all(ack.duplicate for ack in piped_again)
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "step-2"]


async def test_a_re_append_with_changed_content_keeps_the_first_version(log: SessionLog) -> None:
    original = step(1)
    await log.append("s1", original)

    ack = await log.append("s1", StatusChanged(id=original.id, status="failed", reason="rewritten"))

    assert ack.duplicate
    assert [r.event for r in await log.read("s1")] == [original]


async def test_the_same_event_id_in_two_sessions_is_not_a_duplicate(log: SessionLog) -> None:
    a = await log.append("a", step(1))
    b = await log.append("b", step(1))

    assert not b.duplicate
    assert a.seq != b.seq


# --- unknown sessions ------------------------------------------------------------------------------


async def test_reading_an_unknown_session_returns_nothing(log: SessionLog) -> None:
    await log.append("known", step(1))

    assert await log.read("unknown") == []
    assert await log.read("unknown", from_seq=1) == []
    assert not await log.exists("unknown")


async def test_the_client_refuses_an_unknown_session_with_no_such_session(client: agentbus.Client) -> None:
    await client.log.append("known", step(1))

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.show("unknown"),
        lambda: client.state("unknown"),
        lambda: client.say("unknown", "hello"),
        lambda: client.cancel("unknown"),
        lambda: drain(client.tap("unknown", follow=False)),
    ]
    for call in calls:
        with pytest.raises(agentbus.NoSuchSession) as info:
            await call()
        assert info.value.session_id == "unknown"
    assert await client.log.session_ids() == ["known"]


async def test_an_empty_session_id_is_refused_instead_of_reading_every_session(log: SessionLog) -> None:
    await log.append("a", step(1))
    await log.append("b", step(2))

    with pytest.raises(ValueError, match="session id"):
        await log.read("")
    with pytest.raises(ValueError, match="session id"):
        await log.state("")


# --- isolation -------------------------------------------------------------------------------------


async def test_sessions_never_see_each_others_events(client: agentbus.Client) -> None:
    log = client.log
    sids = ["iso", "iso-b", "iso_b", "isob"]
    for i in range(5):
        for sid in sids:
            await log.append(sid, step(i, tag=sid))
            await log.append(sid, note(i), channel="input")

    for sid in sids:
        read = await log.read(sid)
        tapped = await drain(client.tap(sid, follow=False))
        assert {r.session_id for r in read} == {sid}
        assert [r.seq for r in tapped] == [r.seq for r in read]
        assert {r.session_id for r in tapped} == {sid}
        assert [r.event for r in read if r.channel == "log"] == [step(i, tag=sid) for i in range(5)]
        assert len(read) == 10


async def test_a_live_tap_of_one_session_never_sees_another(client: agentbus.Client) -> None:
    await client.log.append("a", step(0, tag="a"))
    tap_a = client.tap("a")
    first = (await collect(tap_a, 1, keep_open=True))[0]

    for i in range(1, 20):
        await client.log.append("b", step(i, tag="b"))
        await client.log.append("a", step(i, tag="a"))
    rest = await collect(tap_a, 19)

    assert [r.session_id for r in [first, *rest]] == ["a"] * 20
    assert _ids([first, *rest]) == [f"a-{i}" for i in range(20)]


# --- replay from a sequence -----------------------------------------------------------------------


async def test_reading_from_seq_n_returns_the_suffix_of_a_full_read(client: agentbus.Client) -> None:
    log = client.log
    for i in range(12):
        await log.append("s1", step(i))
        if i % 3 == 0:
            await log.append("other", step(i))
        if i % 4 == 0:
            await log.append("s1", note(i), channel="input")
    full = await log.read("s1")
    last = await client.bus.stream_last_seq(client.bus.ns.sessions_stream)

    for n in range(0, last + 3):
        suffix = [r for r in full if r.seq >= n]
        assert await log.read("s1", from_seq=n) == suffix, n
        assert await drain(client.tap("s1", start=n, follow=False)) == suffix, n


async def test_reading_with_a_limit_returns_a_prefix_of_the_suffix(log: SessionLog) -> None:
    await log.append_many("s1", [step(i) for i in range(20)])
    full = await log.read("s1")

    assert await log.read("s1", limit=5) == full[:5]
    assert await log.read("s1", from_seq=full[7].seq, limit=3) == full[7:10]
    assert await log.read("s1", from_seq=full[-1].seq, limit=100) == full[-1:]


async def test_reading_one_record_is_the_first_from_the_sequence_on(log: SessionLog) -> None:
    """A read of one record (the router's look at a session) asks a single direct get: the same
    record, sequence, subject and time as a full read, and nothing past the end."""
    await log.append_many("s1", [step(i) for i in range(5)])
    await log.append("s2", step(0))
    await log.append("s1", note(9), channel="input")
    full = await log.read("s1")

    for n in range(0, full[-1].seq + 2):
        assert await log.read("s1", from_seq=n, limit=1) == [r for r in full if r.seq >= n][:1], n
    assert await log.read("nobody", limit=1) == []
    assert await log.read("s1", channels="input.*", limit=1) == full[-1:]


# --- reads are complete and leave nothing behind ----------------------------------------------------


async def _consumers_on(settings: agentbus.Settings, stream: str) -> int:
    """How many consumers the server holds on `stream`, asked over a separate plain connection."""
    nc = await raw_connect(settings)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.consumer_count)
    finally:
        await nc.close()


async def _until_consumers_drop_to(settings: agentbus.Settings, stream: str, count: int) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while (now := await _consumers_on(settings, stream)) > count:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{now} consumers left on {stream} after 5s, expected {count}")
        await asyncio.sleep(0.05)  # polling the server with a deadline, not synchronising


async def test_a_finished_read_leaves_no_consumer_on_the_server(
    client: agentbus.Client, settings: agentbus.Settings
) -> None:
    stream = client.bus.ns.sessions_stream
    await client.log.append_many("s1", [step(i) for i in range(5)])
    before = await _consumers_on(settings, stream)

    for _ in range(3):
        await client.log.read("s1")

    await _until_consumers_drop_to(settings, stream, before)


async def test_a_closed_tap_leaves_no_consumer_on_the_server(
    client: agentbus.Client, settings: agentbus.Settings
) -> None:
    stream = client.bus.ns.sessions_stream
    await client.log.append_many("s1", [step(i) for i in range(5)])
    before = await _consumers_on(settings, stream)

    await collect(client.tap("s1", follow=True), 5)

    await _until_consumers_drop_to(settings, stream, before)


async def test_more_than_a_thousand_reads_in_a_row_all_succeed(log: SessionLog) -> None:
    await log.append("s1", step(1))

    for n in range(1100):
        try:
            await log.read("s1")
        except Exception as err:
            pytest.fail(f"read number {n + 1} raised {type(err).__name__}: {err}")


async def test_concurrent_reads_never_come_back_empty_for_a_session_with_events(log: SessionLog) -> None:
    # A large event (a long tool output) slows delivery, and concurrent reads widen the
    # window in which "is anything pending?" is answered before the events arrive.
    big = ToolCallCompleted(id="big", ts=TS, step=1, tool_use_id="tu", name="cat", output="x" * 500_000)
    await log.append("s1", big)
    await log.append("s1", step(2))

    sizes: list[int] = []
    for _ in range(100):
        sizes += [len(r) for r in await asyncio.gather(*(log.read("s1") for _ in range(4)))]

    assert sizes == [2] * 400, f"{sizes.count(0)} of 400 reads came back empty"


# --- tap: the switch from history to live -----------------------------------------------------------


async def _race_tap_against_appends(client: agentbus.Client, sid: str, total: int, start_after: int) -> None:
    """Append `total` events one by one; start a following tap once `start_after` are in; compare.

    The last event appended has the id "end", so a tap that loses records stops
    there and fails with the difference instead of waiting for a count.
    """
    log = client.log
    await log.append(sid, step(-1))  # the session must exist before anyone may tap it
    started = asyncio.Event()

    async def appender() -> None:
        for i in range(total - 1):
            if i == start_after:
                started.set()
            if i % 5 == 4:
                await log.append(sid, note(i), channel="input")
            else:
                await log.append(sid, step(i))
        started.set()
        await log.append(sid, END)

    writing = asyncio.create_task(appender())
    try:
        await wait_for(started)
        tapped = await collect(client.tap(sid, start="start", follow=True), total + 1, until=END.id)
    finally:
        await writing

    final = await log.read(sid)
    seqs = _seqs(tapped)
    assert len(final) == total + 1
    assert _strictly_increasing(seqs), f"start_after={start_after}: out of order or repeated"
    assert len(set(seqs)) == len(seqs)
    assert seqs == _seqs(final), f"start_after={start_after}: missing {sorted(set(_seqs(final)) - set(seqs))}"
    assert tapped == final


@pytest.mark.parametrize("start_after", [1, 7, 40, 120, 199])
async def test_resumed_tap_loses_and_repeats_nothing_at_the_switch(client: agentbus.Client, start_after: int) -> None:
    await client.log.append("other", step(0))  # the session's records do not start at seq 1

    await _race_tap_against_appends(client, "race", total=200, start_after=start_after)


async def test_many_taps_started_while_appends_race_each_see_the_whole_log(client: agentbus.Client) -> None:
    log = client.log
    sid = "busy"
    total = 400
    await log.append(sid, step(0))
    checkpoints = [asyncio.Event() for _ in range(8)]

    async def appender() -> None:
        for i in range(1, total - 1):
            await log.append(sid, step(i))
            if i % 50 == 0:
                checkpoints[i // 50 - 1].set()
        for cp in checkpoints:
            cp.set()
        await log.append(sid, END)

    async def tap_after(cp: asyncio.Event) -> list[Record]:
        await wait_for(cp)
        return await collect(client.tap(sid, start="start", follow=True), total, until=END.id)

    writing = asyncio.create_task(appender())
    results = await asyncio.gather(*(tap_after(cp) for cp in checkpoints))
    await writing
    final = await log.read(sid)

    assert len(final) == total
    for tapped in results:
        assert _seqs(tapped) == _seqs(final)


async def test_tap_from_a_sequence_resumes_with_no_gap_and_no_duplicate(client: agentbus.Client) -> None:
    log = client.log
    await log.append_many("s1", [step(i) for i in range(10)])
    seen = await collect(client.tap("s1"), 6)

    await log.append_many("s1", [step(i) for i in range(10, 15)])
    resumed = await collect(client.tap("s1", start=seen[-1].seq + 1), 9)

    assert _ids([*seen, *resumed]) == [f"step-{i}" for i in range(15)]


async def test_tap_from_new_sees_only_events_appended_after_it_starts(client: agentbus.Client) -> None:
    log = client.log
    before = [(await log.append("s1", step(i, tag="before"))).seq for i in range(5)]
    tap = client.tap("s1", start="new")

    async def next_record() -> Record:
        return await anext(tap)

    first = asyncio.create_task(next_record())
    try:
        # The tap subscribes at some unknown moment: keep appending until it delivers one.
        appended = 0
        async with asyncio.timeout(COLLECT_TIMEOUT_S):
            while not first.done():
                await log.append("s1", step(appended, tag="after"))
                appended += 1
                await asyncio.wait({first}, timeout=0.01)
        head = first.result()
        head_index = _ids([head])[0].removeprefix("after-")
        rest = await collect(tap, appended - 1 - int(head_index))
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await close(tap)

    tapped = [head, *rest]
    final = await log.read("s1")
    assert head.seq > before[-1]
    assert all(i.startswith("after-") for i in _ids(tapped))
    assert _seqs(tapped) == [r.seq for r in final if r.seq >= head.seq]


async def test_tap_of_all_sessions_sees_every_session(client: agentbus.Client) -> None:
    log = client.log
    sids = [f"all-{n}" for n in range(5)]
    for i in range(4):
        for sid in sids:
            await log.append(sid, step(i, tag=sid))
    history = 4 * len(sids)
    tap = client.tap(None)
    head = await collect(tap, history, keep_open=True)

    await log.append("late", step(0, tag="late"))
    await log.append(sids[0], note(99), channel="input")
    tail = await collect(tap, 2)

    tapped = [*head, *tail]
    expected = sorted(
        [r for sid in [*sids, "late"] for r in await log.read(sid)],
        key=lambda r: r.seq,
    )
    assert tapped == expected
    assert {r.session_id for r in tapped} == {*sids, "late"}


async def test_a_non_following_tap_ends_at_the_current_end(client: agentbus.Client) -> None:
    await client.log.append_many("s1", [step(i) for i in range(30)])

    tapped = await drain(client.tap("s1", follow=False))

    assert _ids(tapped) == [f"step-{i}" for i in range(30)]


async def test_a_tap_whose_reader_falls_behind_its_buffer_recreates_and_loses_nothing(
    client: agentbus.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py hands a tap's messages over in its read loop, which cannot wait for the reader: past
    the buffer they are dropped, and the gap in consumer sequences recreates the consumer from the
    first one missing. A tiny buffer makes that happen on every few records."""
    from agentbus.bus import _tap

    feeds: list[_tap.Feed] = []
    made = _tap.Feed

    def counted() -> _tap.Feed:
        feed = made()
        feeds.append(feed)
        return feed

    monkeypatch.setattr(_tap, "_REPLAY_BUFFER", 8)
    monkeypatch.setattr(_tap, "Feed", counted)
    await client.log.append_many("s1", [step(i) for i in range(200)])

    tapped = []
    async for rec in client.tap("s1", follow=False):
        tapped.append(rec)
        await asyncio.sleep(0.001)  # a slow reader: the server sends far more than 8 meanwhile

    assert _ids(tapped) == [f"step-{i}" for i in range(200)]
    assert [r.seq for r in tapped] == sorted({r.seq for r in tapped})
    assert sum(f.dropped for f in feeds) > 0 and len(feeds) > 2, "no message was dropped: the test proves nothing"


# --- the fence ---------------------------------------------------------------------------------------


async def test_of_two_writers_the_first_append_wins_and_the_second_is_fenced(log: SessionLog) -> None:
    await log.append("s1", step(0))
    first, second = await log.writer("s1"), await log.writer("s1")

    won = await first.append(step(1, tag="first"))
    with pytest.raises(agentbus.FencedError) as info:
        await second.append(step(1, tag="second"))

    assert info.value.session_id == "s1"
    assert info.value.expected_seq == second.last_seq
    assert _ids(await log.read("s1")) == ["step-0", "first-1"]
    assert first.last_seq == won.seq


async def test_the_fence_holds_on_a_session_with_no_log_yet(log: SessionLog) -> None:
    first, second = await log.writer("fresh"), await log.writer("fresh")

    await first.append(step(1, tag="first"))
    with pytest.raises(agentbus.FencedError):
        await second.append(step(1, tag="second"))

    assert _ids(await log.read("fresh")) == ["first-1"]


async def test_a_fenced_writer_continues_after_resync_and_fences_the_other(log: SessionLog) -> None:
    await log.append("s1", step(0))
    first, second = await log.writer("s1"), await log.writer("s1")
    await first.append(step(1, tag="first"))
    await first.append(step(2, tag="first"))
    with pytest.raises(agentbus.FencedError):
        await second.append(step(1, tag="second"))

    foreign = await second.resync()
    await second.append(step(1, tag="second"))
    with pytest.raises(agentbus.FencedError):
        await first.append(step(3, tag="first"))

    assert _ids(foreign) == ["first-1", "first-2"]
    assert _ids(await log.read("s1")) == ["step-0", "first-1", "first-2", "second-1"]


async def test_resync_with_nothing_foreign_returns_nothing_and_keeps_the_position(log: SessionLog) -> None:
    writer = await log.writer("s1")
    await writer.append(step(1))
    position = writer.last_seq

    assert await writer.resync() == []
    assert writer.last_seq == position
    await writer.append(step(2))


def _lose_one_ack(bus: Bus, then: Callable[[], Awaitable[object]] | None = None) -> list[int]:
    """The next publish is stored, but its ack is lost (as through a failover): the bus retries it.
    `then` runs between the store and the loss (another writer, say). Returns the stored sequences."""
    real = bus._acked
    stored: list[int] = []

    async def acked(subject: str, data: bytes, hdrs: dict[str, str]) -> object:
        ack = await real(subject, data, hdrs)
        if not stored:
            stored.append(ack.seq)
            if then is not None:
                await then()
            raise TimeoutError("the ack was lost")
        return ack

    bus._acked = acked  # type: ignore[method-assign]
    return stored


async def test_a_fenced_append_whose_ack_was_lost_is_its_own_stored_first_attempt_not_a_fence(
    log: SessionLog,
) -> None:
    # nats-server checks the fence before the Nats-Msg-Id: the retry is refused as fenced
    await log.append("s1", step(0))
    writer = await log.writer("s1")
    stored = _lose_one_ack(log.bus)

    ack = await writer.append(step(1))

    assert stored and ack.seq == stored[0] and ack.duplicate
    assert writer.last_seq == ack.seq
    await writer.append(step(2))  # still the owner
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "step-2"]


async def test_after_a_lost_ack_a_later_foreign_append_still_fences_the_writer(log: SessionLog) -> None:
    await log.append("s1", step(0))
    writer, other = await log.writer("s1"), await log.writer("s1")

    async def other_writes() -> None:
        other.last_seq = stored[0]
        await other.append(step(2, tag="other"))

    stored = _lose_one_ack(log.bus, other_writes)
    ack = await writer.append(step(1))
    assert ack.seq == stored[0]
    with pytest.raises(agentbus.FencedError):
        await writer.append(step(2))
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "other-2"]


async def test_another_writer_appending_the_same_id_with_other_content_stays_fenced(log: SessionLog) -> None:
    # two agents at the same step write the same event id, each with its own model reply
    await log.append("s1", step(0))
    first, second = await log.writer("s1"), await log.writer("s1")
    await first.append(step(1))
    theirs = msgspec.structs.replace(step(1), output="the second agent's")
    with pytest.raises(agentbus.FencedError):
        await second.append(theirs)  # the same id, other content: not the record stored
    [_, stored] = await log.read("s1")
    assert stored.event == step(1)


async def test_human_messages_on_the_input_channel_do_not_break_the_fence(client: agentbus.Client) -> None:
    await client.log.append("s1", step(0))
    writer = await client.log.writer("s1")

    await writer.append(step(1))
    await client.say("s1", "steer left")
    await client.cancel("s1", reason="changed my mind")
    await client.log.append("s1", note(7), channel="input")
    await writer.append(step(2))

    assert [r.channel for r in await client.log.read("s1")] == ["log", "log", "input", "input", "input", "log"]
    assert await writer.resync() == []


async def test_a_writer_re_appending_its_own_event_gets_the_same_sequence(log: SessionLog) -> None:
    writer = await log.writer("s1")
    ack = await writer.append(step(1))

    again = await writer.append(step(1))

    assert again.duplicate
    assert again.seq == ack.seq
    await writer.append(step(2))


# --- crash survival ---------------------------------------------------------------------------------


async def test_closing_survives_a_cancellation_not_meant_for_it_and_honours_its_own(settings: Settings) -> None:
    """nats-py's close awaits its socket's close waiter, which a lost connection may have cancelled:
    its CancelledError is not the closer's, and the bus is closed all the same (CI once failed the
    kill -9 test on it). A close that is itself cancelled still stops."""
    bus = await Bus.connect(settings)
    nc = bus._nc
    closing = nc.close

    async def drain_like_a_lost_socket() -> None:
        await closing()
        raise asyncio.CancelledError

    nc.drain = drain_like_a_lost_socket  # type: ignore[method-assign]
    await bus.close()
    assert nc.is_closed

    bus = await Bus.connect(settings)
    nc, never = bus._nc, asyncio.Event()
    closing = nc.close

    async def drain_for_ever() -> None:
        await never.wait()

    nc.drain = drain_for_ever  # type: ignore[method-assign]
    task = asyncio.create_task(bus.close())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await closing()


async def test_events_survive_kill_9_of_the_server_and_a_restart(tmp_path: Path) -> None:
    server = await asyncio.to_thread(NatsServer(store_dir=tmp_path).start)
    try:
        settings = agentbus.Settings(nats_url=server.url, prefix="crash", creds=str(server.admin_creds))
        async with agentbus.connect(settings=settings) as before:
            sid = await before.submit("survive a crash", pool="writers", session_id="crash1")
            writer = await before.log.writer(sid)
            for i in range(20):
                await writer.append(step(i))
            await before.log.append_many(sid, [step(i) for i in range(20, 60)])
            await before.say(sid, "still there?")
            written = await before.show(sid)
            port = server.port
            await asyncio.to_thread(server.kill)  # while the writer is still connected
        # closed with its server gone: closed for good, not left reconnecting for ever
        assert before.bus._nc.is_closed

        await asyncio.to_thread(server.start)

        async with agentbus.connect(settings=settings) as after:
            assert server.port == port
            read_back = await after.show(sid)
            state = await after.state(sid)
            replayed = await after.log.append(sid, step(59))
            resumed = await after.log.writer(sid)
            position = resumed.last_seq
            await resumed.append(step(60))
    finally:
        await asyncio.to_thread(server.kill)

    assert len(written) == 63
    assert read_back == written
    assert state.status == "queued"
    assert state.last_seq == written[-1].seq
    assert replayed.duplicate, "the dedupe window must survive a restart, or a resumed agent duplicates"
    assert position == written[-2].seq


# --- the state fold ----------------------------------------------------------------------------------


async def test_state_after_submit_to_a_pool_is_queued(client: agentbus.Client) -> None:
    sid = await client.submit("write a haiku", pool="writers")

    state = await client.state(sid)

    assert state.status == "queued"
    assert state.pool == "writers"
    assert state.prompt == "write a haiku"


async def test_state_after_submit_without_a_pool_is_pending(client: agentbus.Client) -> None:
    sid = await client.submit("write a haiku")

    assert (await client.state(sid)).status == "pending"


async def test_a_human_message_leaves_the_status_unchanged(client: agentbus.Client) -> None:
    sid = await client.submit("write a haiku", pool="writers")
    before = await client.state(sid)

    seq = await client.say(sid, "make it rhyme")
    after = await client.state(sid)

    assert after.status == before.status == "queued"
    assert after.last_seq == seq
    assert after.events == before.events + 1


async def test_cached_state_picks_up_events_appended_after_it(client: agentbus.Client) -> None:
    sid = await client.submit("write a haiku", pool="writers")
    cached = await client.state(sid)
    events: list[Event] = [
        SessionClaimed(id="claim-1", worker="agent-7"),
        ModelResponded(id="model-1", step=1, model="m", content=(), usage=Usage(input_tokens=10), cost_usd=0.25),
        step(1),
    ]
    for ev in events:
        await client.log.append(sid, ev)

    state = await client.state(sid)
    records = await client.log.read(sid)
    folded = SessionState(session_id=sid)
    for rec in records:
        folded = fold(folded, rec)
    stored = await client.bus.kv_get(client.bus.ns.state_bucket, sid)

    assert cached.status == "queued"
    assert state == folded
    assert (state.status, state.owner, state.steps, state.tool_calls, state.cost_usd) == (
        "running",
        "agent-7",
        1,
        1,
        0.25,
    )
    assert state.last_seq == records[-1].seq
    assert stored is not None and b'"last_seq":%d' % records[-1].seq in stored[0]
    assert await client.state(sid) == state


async def test_state_from_a_stale_cache_equals_a_fresh_fold(client: agentbus.Client) -> None:
    sid = await client.submit("write a haiku", pool="writers")
    writer: SessionWriter = await client.log.writer(sid)
    for i in range(10):
        await writer.append(step(i))
        if i % 3 == 0:
            await client.state(sid)  # leave the cache at some point in the past
    await client.say(sid, "done yet?")

    state = await client.state(sid)
    folded = SessionState(session_id=sid)
    for rec in await client.log.read(sid):
        folded = fold(folded, rec)

    assert state == folded
    assert state.tool_calls == 10


@pytest.mark.parametrize("bound", ["messages", "bytes"])
async def test_a_tap_read_slowly_past_its_buffer_loses_and_repeats_nothing(
    client: agentbus.Client, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """What arrives past a tap's buffer (in messages, or in payload bytes) is dropped, and the
    tap recreates its consumer from the first record it did not hand over: the reader sees every
    record once, in order. Bounds made small so a slow reader meets them."""
    from agentbus.bus import _tap

    if bound == "messages":
        monkeypatch.setattr(_tap, "_REPLAY_BUFFER", 4)
    else:
        monkeypatch.setattr(_tap, "_REPLAY_BYTES", 3_000)
    big = [
        ToolCallCompleted(id=f"big-{i}", ts=TS + i, step=i, tool_use_id=f"tu-{i}", name="echo", output="x" * 1_000)
        for i in range(40)
    ]
    await client.log.append_many("s1", big)
    recreated: list[str] = []
    recreate = _tap.Tap._recreate

    async def counted(self: _tap.Tap, why: str) -> None:
        recreated.append(why)
        await recreate(self, why)

    monkeypatch.setattr(_tap.Tap, "_recreate", counted)
    tap = client.tap("s1", follow=False)
    seen: list[Record] = []
    async with asyncio.timeout(COLLECT_TIMEOUT_S):
        async for rec in tap:
            seen.append(rec)
            await asyncio.sleep(0.01)  # slower than the server sends: the buffer fills
    assert _ids(seen) == [f"big-{i}" for i in range(40)]
    assert _strictly_increasing([r.seq for r in seen])
    assert "messages dropped past the buffer" in recreated  # the path under test was taken


# --- messages published together (one round trip for a few acks) -----------------------------------


async def test_messages_published_together_are_stored_in_order_each_with_its_ack(log: SessionLog) -> None:
    bus = log.bus
    out = [log.outgoing("s1", step(i)) for i in range(3)]
    acks = await bus.publish_together(out)
    records = await log.read("s1")
    assert _ids(records) == ["step-0", "step-1", "step-2"]
    assert [a.seq for a in acks] == [r.seq for r in records] and not any(a.duplicate for a in acks)
    again = await bus.publish_together(out)  # each kept its Nats-Msg-Id
    assert [a.seq for a in again] == [a.seq for a in acks] and all(a.duplicate for a in again)


async def test_messages_published_together_whose_acks_were_lost_are_settled_one_by_one(log: SessionLog) -> None:
    bus = log.bus
    real = bus.ask_together

    async def lost(requests: Any, timeout: float) -> Any:
        answers = await real(requests, timeout)  # stored, and the second ack lost
        return [answers[0], TimeoutError("no answer")]

    bus.ask_together = lost  # type: ignore[method-assign]
    acks = await bus.publish_together([log.outgoing("s1", step(i)) for i in range(2)])
    assert [a.duplicate for a in acks] == [False, True]  # the second sent again alone: stored once
    assert _ids(await log.read("s1")) == ["step-0", "step-1"]


async def test_messages_published_together_to_a_refused_subject_are_refused_at_once(
    client: agentbus.Client, as_user: Any
) -> None:
    from agentbus.errors import NotPermitted

    sid = await client.submit("watched")
    async with await Bus.connect(as_user("watcher", "observer", sessions=[sid])) as bus:
        log = SessionLog(bus)
        with pytest.raises(NotPermitted):
            await asyncio.wait_for(bus.publish_together([log.outgoing(sid, note(1), channel="input")]), 3)


# --- an event sent right behind another (the final answer and the end: one round trip) ---------------


async def test_an_event_sent_behind_another_is_stored_right_after_it_and_the_writer_owns_both(
    log: SessionLog,
) -> None:
    await log.append("s1", step(0))
    writer = await log.writer("s1")

    ack, after, unseen = await writer.append_then(step(1), END, people_seq=0, attempt="7-1")

    assert after is not None and after.seq == ack.seq + 1 and not after.duplicate and not unseen
    assert writer.last_seq == after.seq
    await writer.append(step(2))  # still the owner, positioned after both
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "end", "step-2"]


async def test_an_event_sent_behind_a_fenced_one_is_not_stored(log: SessionLog) -> None:
    await log.append("s1", step(0))
    writer, other = await log.writer("s1"), await log.writer("s1")
    await other.append(step(1, tag="other"))

    with pytest.raises(agentbus.FencedError):
        await writer.append_then(step(1), END, people_seq=0, attempt="7-1")
    assert _ids(await log.read("s1")) == ["step-0", "other-1"]


async def test_an_event_sent_behind_follows_this_attempt_only_not_another_writers_record_of_the_same_id(
    log: SessionLog,
) -> None:
    # Two agents at the same step write the same event id. The second one's answer is fenced; its
    # end must not be stored behind the first one's answer, which is the stream's last message and
    # has the id the second one's would have had without the attempt in it.
    await log.append("s1", step(0))
    first, second = await log.writer("s1"), await log.writer("s1")
    await first.append(step(1))
    theirs = msgspec.structs.replace(step(1), output="the second agent's")

    with pytest.raises(agentbus.FencedError):
        await second.append_then(theirs, END, people_seq=0, attempt="9-2")
    assert _ids(await log.read("s1")) == ["step-0", "step-1"]


async def test_an_event_sent_behind_another_with_a_message_between_them_is_left_to_the_caller(
    log: SessionLog,
) -> None:
    await log.append("s1", step(0))
    writer = await log.writer("s1")
    real = log.bus.ask_together

    async def another_session_between(requests: Any, timeout: float) -> Any:
        head = await real(requests[:1], timeout)
        await log.append("s2", step(9))  # any session's record: the stream is every session's
        return head + await real(requests[1:], timeout)

    log.bus.ask_together = another_session_between  # type: ignore[method-assign]
    ack, after, unseen = await writer.append_then(step(1), END, people_seq=0, attempt="7-1")
    log.bus.ask_together = real  # type: ignore[method-assign]

    assert after is None and not unseen and writer.last_seq == ack.seq
    assert _ids(await log.read("s1")) == ["step-0", "step-1"]
    await writer.append(END)  # the usual way
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "end"]


async def test_an_event_sent_behind_another_is_kept_out_by_a_persons_record_the_writer_has_not_seen(
    log: SessionLog,
) -> None:
    await log.append("s1", step(0))
    known = await log.append("s1", note(1), channel="input")
    writer = await log.writer("s1")
    unseen = await log.append("s1", note(2), channel="input")  # stored before the answer, not read

    ack, after, people_wrote = await writer.append_then(step(1), END, people_seq=known.seq, attempt="7-1")
    assert after is None and people_wrote and writer.last_seq == ack.seq  # the answer is stored, the end not
    ack, after, people_wrote = await writer.append_then(step(2), END, people_seq=unseen.seq, attempt="7-1")
    assert after is not None and after.seq == ack.seq + 1 and not people_wrote
    assert _ids(await log.read("s1")) == ["step-0", "note-1", "note-2", "step-1", "step-2", "end"]


async def test_an_event_sent_behind_another_whose_ack_was_lost_is_looked_up_and_found_as_its_own(
    log: SessionLog,
) -> None:
    await log.append("s1", step(0))
    writer = await log.writer("s1")
    real = log.bus.ask_together

    async def tail_ack_lost(requests: Any, timeout: float) -> Any:
        answers = await real(requests, timeout)
        return [answers[0], TimeoutError("no answer")]

    log.bus.ask_together = tail_ack_lost  # type: ignore[method-assign]
    ack, after, _ = await writer.append_then(step(1), END, people_seq=0, attempt="7-1")
    log.bus.ask_together = real  # type: ignore[method-assign]

    # stored, but nobody said so: the writer looks, and finds it byte for byte as its own
    assert after is not None and after.duplicate and after.seq == ack.seq + 1 == writer.last_seq
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "end"]


async def test_two_events_sent_together_whose_acks_were_both_lost_are_both_found_as_the_writers(
    log: SessionLog,
) -> None:
    await log.append("s1", step(0))
    writer = await log.writer("s1")
    real = log.bus.ask_together

    async def both_lost(requests: Any, timeout: float) -> Any:
        await real(requests, timeout)  # both stored
        return [TimeoutError("no answer")] * len(requests)

    log.bus.ask_together = both_lost  # type: ignore[method-assign]
    ack, after, _ = await writer.append_then(step(1), END, people_seq=0, attempt="7-1")
    log.bus.ask_together = real  # type: ignore[method-assign]

    # the answer sent again alone is fenced by itself, found as the writer's; then the end is looked up
    assert ack.duplicate and after is not None and after.duplicate
    assert after.seq == ack.seq + 1 == writer.last_seq
    assert _ids(await log.read("s1")) == ["step-0", "step-1", "end"]
