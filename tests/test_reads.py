"""Reads with direct gets never ask the server past the end of what they read.

A batched direct get asked for more than is left searches the rest of the stream for another match,
and one that starts past its subject's first message counts what is pending the slow way: both cost
the server time in proportion to everything stored after the session, so a read of an old session
grew with the stream (8 ms with 50,000 sessions after it). These tests read sessions of every shape
against a real server, with a spy on the requests the connection sends, and hold each request to
what the stream holds: a batch never asks for more messages than match from its start on, a batch
that does not start at 1 only goes on from a full one, and a single get always has a match to find.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentbus.bus import Bus, _read
from agentbus.bus._read import _FIRST_ASK
from agentbus.config import Settings

LENGTHS = (1, 2, 3, 5, 17, 40, 999, 1000, 1001, 2003)


class _Spy:
    """Every direct-get request the bus's connection publishes, as sent."""

    def __init__(self, bus: Bus) -> None:
        self.requests: list[dict[str, Any]] = []
        nc = bus._nc
        publish = nc.publish

        async def spying(subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> None:
            if subject.startswith("$JS.API.DIRECT.GET."):
                # a lookup of a subject's last message names it in the API subject, with no payload
                self.requests.append(json.loads(payload) if payload else {"last_by_subj": subject})
            await publish(subject, payload, *args, **kwargs)

        nc.publish = spying  # type: ignore[method-assign]


@pytest.fixture
async def stream(settings: Settings) -> AsyncIterator[tuple[Bus, str, dict[str, list[int]]]]:
    """Sessions of every length in LENGTHS, their records interleaved with each other's and with
    a thousand records of sessions stored after them all; the sequences each session holds."""
    async with await Bus.connect(settings) as bus:
        await bus.provision()
        js = bus._nc.jetstream()
        rng = random.Random(31)
        left = {f"len{n}": n for n in LENGTHS}
        seqs: dict[str, list[int]] = {sid: [] for sid in left}
        while left:
            batch = rng.sample(sorted(left), min(len(left), 3))
            acks = []
            for sid in batch:
                channel = rng.choice(("log", "log", f"input.{bus.user}", f"control.{bus.user}"))
                subject = f"{bus.ns.session_log(sid).removesuffix('.log')}.{channel}"
                acks.append((sid, await js.publish_async(subject, b'{"type":"x"}')))
                left[sid] -= 1
                if not left[sid]:
                    del left[sid]
            for sid, ack in acks:
                seqs[sid].append((await ack).seq)
        later = [await js.publish_async(bus.ns.session_log(f"after{i}"), b"{}") for i in range(1000)]
        await asyncio.gather(*later)
        yield bus, bus.ns.sessions_stream, seqs


def _held_to_the_stream(requests: list[dict[str, Any]], held: list[int]) -> None:
    for req in requests:
        if "last_by_subj" in req:
            continue  # the server's subject index answers it: nothing is searched
        matching = [s for s in held if s >= req["seq"]]
        if "batch" in req:
            # the one exception: the first request of a whole read asks for two (a fresh session's
            # creation and route, in one request), which a session holding one record does not fill
            first = req["seq"] == 1 and req["batch"] == _FIRST_ASK
            assert req["batch"] <= len(matching) or first, f"asked past the end: {req} with {len(matching)} left"
            assert req["seq"] == 1 or req["seq"] - 1 in held, f"a batch starting mid-way, not after a full one: {req}"
        else:
            assert matching, f"a single get with nothing left to find: {req}"


@pytest.mark.parametrize("most", [10_000, 1000], ids=["one-request", "in-requests-of-1000"])
async def test_a_whole_read_of_any_length_asks_for_no_more_than_is_there(
    stream: tuple[Bus, str, dict[str, list[int]]], most: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_read, "_DIRECT_BATCH", most)  # a long log then goes on from where a request ended
    bus, name, seqs = stream
    spy = _Spy(bus)
    for sid, held in seqs.items():
        spy.requests.clear()

        got = await bus.read_direct(name, bus.ns.session_all(sid), lambda d: d.seq)

        assert got == held, sid
        _held_to_the_stream(spy.requests, held)
        assert len(spy.requests) <= 2 + len(held) // most, (sid, spy.requests)  # counted once, then read


@pytest.mark.parametrize("length", [3, 40, 1001, 2003])
async def test_a_read_from_further_on_asks_for_no_more_than_is_there(
    stream: tuple[Bus, str, dict[str, list[int]]], length: int
) -> None:
    bus, name, seqs = stream
    spy = _Spy(bus)
    held = seqs[f"len{length}"]
    for start in sorted({1, 2, len(held) // 2, len(held) - 17, len(held) - 16, len(held) - 1, len(held)}):
        if not 0 < start <= len(held):
            continue
        from_seq = held[start - 1]
        for limit in (None, 1, 5, 20):
            spy.requests.clear()

            got = await bus.read_direct(name, bus.ns.session_all(f"len{length}"), lambda d: d.seq, from_seq, limit)

            expected = [s for s in held if s >= from_seq][:limit]
            assert got == expected, (start, limit)
            _held_to_the_stream(spy.requests, held)


async def test_a_read_past_the_end_or_of_nothing_asks_nothing_it_cannot_find(
    stream: tuple[Bus, str, dict[str, list[int]]],
) -> None:
    bus, name, seqs = stream
    spy = _Spy(bus)
    held = seqs["len17"]

    assert await bus.read_direct(name, bus.ns.session_all("len17"), lambda d: d.seq, held[-1] + 1) == []
    assert await bus.read_direct(name, bus.ns.session_all("nosuchsession"), lambda d: d.seq) == []
    assert [r for r in spy.requests if "batch" in r and r["next_by_subj"].endswith("len17.>")] == []


async def test_a_whole_read_takes_in_what_is_appended_while_it_counts(
    stream: tuple[Bus, str, dict[str, list[int]]],
) -> None:
    """Records appended between the request that counts and the one that reads: the read goes on
    and returns them too, in order, without asking past the end."""
    bus, name, seqs = stream
    sid = "len5"
    js = bus._nc.jetstream()
    spy = _Spy(bus)
    appended: list[int] = []
    publish = bus._nc.publish

    async def append_after_each_request(subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> None:
        await publish(subject, payload, *args, **kwargs)
        if subject.startswith("$JS.API.DIRECT.GET.") and len(appended) < 4:
            ack = await js.publish(bus.ns.session_log(sid), b'{"type":"y"}')
            appended.append(ack.seq)

    bus._nc.publish = append_after_each_request  # type: ignore[method-assign]
    got = await bus.read_direct(name, bus.ns.session_all(sid), lambda d: d.seq)
    bus._nc.publish = publish  # type: ignore[method-assign]

    assert got[: len(seqs[sid])] == seqs[sid]
    assert got == sorted(got) and len(set(got)) == len(got)
    assert set(got) <= set(seqs[sid]) | set(appended)
    assert len(got) >= len(seqs[sid]) + len(appended) - 1  # whatever was stored before the last request
    assert spy.requests, "the spy saw the requests"


async def test_a_read_from_further_on_given_the_last_sequence_ends_there_without_looking_it_up(
    stream: tuple[Bus, str, dict[str, list[int]]],
) -> None:
    bus, name, seqs = stream
    spy = _Spy(bus)
    held = seqs["len17"]

    got = await bus.read_direct(name, bus.ns.session_all("len17"), lambda d: d.seq, held[2], last=held[5])

    assert got == held[2:6]
    assert not [r for r in spy.requests if "last_by_subj" in r]
    _held_to_the_stream(spy.requests, held)
