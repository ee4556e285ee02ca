"""`ts` means seconds since the epoch: milliseconds are refused, not folded; a missing `ts` is the stream's time."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

import agentbus
from agentbus import messages
from agentbus.messages import HumanMessage, InvalidEvent, SessionCreated, Task, Timer
from agentbus.state import SessionState

TS = 1767225600.5
SAY = {"type": "human_message", "id": "say-1", "text": "hi", "author": "ann"}


@pytest.mark.parametrize("ts", [TS * 1000, 1767225600500, -1, 0, 12.5, 1e10], ids=repr)
def test_a_ts_that_is_not_plausible_seconds_is_refused_with_the_reason(ts: float) -> None:
    event = messages.decode_event(json.dumps({**SAY, "ts": ts}).encode())

    assert isinstance(event, InvalidEvent)
    assert event.id == "say-1"
    assert f"ts {ts!r} is not seconds since the epoch" in event.reason


def test_an_unknown_event_type_with_a_millisecond_ts_is_refused_too() -> None:
    event = messages.decode_event(json.dumps({"type": "from_later", "id": "x", "ts": TS * 1000, "v": 9}).encode())

    assert isinstance(event, InvalidEvent) and "not seconds" in event.reason


def test_an_event_without_ts_takes_the_time_the_stream_stored_it() -> None:
    data = json.dumps(SAY).encode()

    assert messages.decode_event(data, stored_ts=TS) == HumanMessage(id="say-1", ts=TS, text="hi", author="ann")
    assert messages.decode_event(data).ts == 0.0  # a caller that does not know when it was stored


def test_an_event_made_here_without_ts_takes_the_writers_clock() -> None:
    before = time.time()

    event = HumanMessage(id="say-1", text="hi", author="ann")

    assert before <= event.ts <= time.time()


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (Timer, {"session_id": "s1", "due_ts": TS * 1000}),
        (messages.WorkerInfo, {"worker_id": "w", "pool": "p", "heartbeat_ts": TS * 1000}),
        (messages.PoolSpend, {"pool": "p", "since_ts": TS * 1000}),
        (SessionState, {"session_id": "s1", "updated_ts": TS * 1000}),
    ],
    ids=["timer", "registry", "spend", "state"],
)
def test_every_other_timestamp_on_the_wire_is_seconds_too(kind: type, payload: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"< 10000000000\.0"):
        msgspec.json.decode(json.dumps(payload).encode(), type=kind)


async def test_a_foreign_millisecond_message_reads_back_invalid_and_never_reaches_the_state(
    client: agentbus.Client,
) -> None:
    sid = await client.submit("hello", pool="writers")
    before = await client.state(sid)
    subject = client.bus.ns.session_input(sid, client.bus.user)
    ms = {**SAY, "id": "say-ms", "ts": time.time() * 1000}

    await client.bus.publish(subject, json.dumps(ms).encode(), msg_id=f"{sid}:say-ms")

    records = await client.show(sid)
    state = await client.state(sid)
    assert isinstance(records[-1].event, InvalidEvent)
    assert "is not seconds since the epoch" in records[-1].event.reason
    assert state.events == before.events + 1
    assert before.updated_ts <= state.updated_ts < 1e10  # at most the time it arrived, never 1000 times on


async def test_a_foreign_session_created_in_milliseconds_creates_no_session_with_a_wrong_clock(
    client: agentbus.Client,
) -> None:
    task = msgspec.to_builtins(Task(session_id="ms1", prompt="hello", pool="writers"))
    created = {"type": "session_created", "id": "created", "ts": time.time() * 1000, "task": task}
    subject = client.bus.ns.session_control("ms1", client.bus.user)

    await client.bus.publish(subject, json.dumps(created).encode(), msg_id="ms1:created")

    first = (await client.show("ms1"))[0].event
    state = await client.state("ms1")
    assert isinstance(first, InvalidEvent) and "not seconds" in first.reason
    assert state.created_ts == 0.0  # so no wall-clock budget is measured from a clock 1000 times off


async def test_every_reader_gives_an_event_without_ts_the_same_time_the_streams(client: agentbus.Client) -> None:
    sid = await client.submit("hello", pool="writers")
    subject = client.bus.ns.session_input(sid, client.bus.user)
    ack = await client.bus.publish(subject, json.dumps({**SAY, "id": "say-nots"}).encode(), msg_id=f"{sid}:say-nots")
    stored = await client.bus.next_stored(client.bus.ns.sessions_stream, subject, ack.seq)
    assert stored is not None

    first = (await client.show(sid))[-1].event
    again = [r async for r in client.tap(sid, follow=False)][-1].event

    assert isinstance(first, HumanMessage) and isinstance(again, HumanMessage)
    assert first.ts == again.ts == pytest.approx(stored.time, abs=1e-3)


async def test_a_cached_state_with_a_millisecond_clock_is_not_trusted(client: agentbus.Client) -> None:
    sid = await client.submit("hello", pool="writers")
    real = await client.state(sid)
    forged = msgspec.json.encode(msgspec.structs.replace(real, updated_ts=real.updated_ts * 1000, steps=99))
    await client.bus.kv_put(client.bus.ns.state_bucket, sid, forged)

    state = await client.state(sid)

    assert state.steps == 0 and state.updated_ts == real.updated_ts


def test_the_sample_session_created_keeps_a_seconds_clock() -> None:
    created = messages.decode_event(
        messages.encode(SessionCreated(id="created", ts=TS, task=Task(session_id="s", prompt="p")))
    )

    assert isinstance(created, SessionCreated) and created.ts == TS


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-30T07:21:47.836122756Z",
        "2026-11-30T07:21:47Z",
        "2026-11-30T07:21:47.8Z",
        "2026-11-30T07:21:47.83612275612Z",  # more digits than nanoseconds: cut, as before
        "2026-11-30T23:59:59.999999999Z",
        "2026-13-30T07:21:47.1Z",  # no such month
        "2026-11-30T07:21:4x.1Z",
        "2026-11-30T07:21:47.1+00:00",  # not the server's shape: the general parser
        "2026-11-30T07:21:47",
        "",
        "garbage",
    ],
)
def test_the_stream_time_of_a_record_reads_the_same_by_the_quick_path_as_by_the_general_parser(stamp: str) -> None:
    """A direct get's `Nats-Time-Stamp` is read for every record of a replay; the quick path (the
    minute looked up, the rest as digits) must agree with parsing the whole stamp."""
    import datetime

    from agentbus.bus import _types

    whole, _, frac = stamp.rstrip("Z").partition(".")
    try:
        seconds = int(datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp())
        digits = (frac + "000000000")[:9]
        expected = seconds * 1_000_000_000 + int(digits) if digits.isdigit() else 0
    except ValueError:
        expected = 0
    assert _types._timestamp_ns(stamp) == expected
    assert _types._timestamp_ns(stamp) == expected  # and again, from the cached minute
