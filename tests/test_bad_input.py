"""Bad input: garbage in the log, events from the future, oversized prompts, names that break subjects."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

import agentbus
from agentbus import messages
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.errors import BusError
from agentbus.messages import HumanMessage, InvalidEvent, Record, ToolCallCompleted, UnknownEvent
from tests.conftest import AsUser

BAD_IDS = ["a.b", "a b", "a*", "a>", "", "x" * 65, "a/b", "ü"]
BAD_POOLS = ["x.y", "x y", "x*", "x>", "", "p" * 65]
TS = 1_700_000_000.5


def step(i: int) -> ToolCallCompleted:
    return ToolCallCompleted(id=f"step-{i}", ts=TS + i, step=i, tool_use_id=f"tu{i}", name="echo", output=str(i))


async def drain(records: AsyncIterator[Record]) -> list[Record]:
    """Everything a non-following tap yields (or the error it raises), closing it after."""
    try:
        return [rec async for rec in records]
    finally:
        aclose = getattr(records, "aclose", None)
        if aclose is not None:
            await aclose()


@pytest.fixture
async def small_client(settings: Settings) -> AsyncIterator[agentbus.Client]:
    """A client whose prompt limit is 1000 bytes."""
    async with agentbus.connect(settings=settings.with_(max_prompt_bytes=1000)) as c:
        yield c


async def nothing_was_written(client: agentbus.Client) -> bool:
    ns = client.bus.ns
    return (
        await client.log.session_ids() == []
        and await client.bus.stream_last_seq(ns.sessions_stream) == 0
        and await client.bus.stream_last_seq(ns.work_stream) == 0
        and await client.bus.stream_last_seq(ns.submissions_stream) == 0
    )


# --- garbage in the log ----------------------------------------------------------------------------


async def test_malformed_bytes_in_a_session_come_back_as_an_invalid_record(client: agentbus.Client) -> None:
    sid = await client.submit("hello", pool="writers")
    await client.log.append(sid, step(1))
    await client.bus.publish(client.bus.ns.session_log(sid), b"\xff not json", msg_id="x")
    await client.log.append(sid, step(2))

    shown = await client.show(sid)
    tapped = await drain(client.tap(sid, follow=False))

    for records in (shown, tapped):
        assert [messages.event_type(r.event) for r in records] == [
            "session_created",
            "routed",
            "tool_call_completed",
            "invalid",
            "tool_call_completed",
        ]
        bad = records[3].event
        assert isinstance(bad, InvalidEvent)
        assert bad.reason.startswith("not JSON")
        assert "not json" in bad.raw
        assert records[2].event == step(1)
        assert records[4].event == step(2)
        assert records[3].session_id == sid
        assert records[3].channel == "log"


async def test_a_session_with_garbage_in_it_still_has_a_state(client: agentbus.Client) -> None:
    sid = await client.submit("hello", pool="writers")
    await client.bus.publish(client.bus.ns.session_log(sid), b"\xff not json", msg_id="x")
    await client.bus.publish(client.bus.ns.session_input(sid, client.bus.user), b"[1, 2, 3]", msg_id="y")
    seq = await client.say(sid, "still there?")

    state = await client.state(sid)

    assert state.status == "queued"
    assert state.last_seq == seq
    assert state.events == 5


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"null",
        b"{}",
        b'{"type": "human_message", "id": "h1", "text": 5, "author": "x"}',
        b'{"type": "human_message", "id": "h1", "text": "caf\xc3", "author": "x"}',
        b'{"type": "human_message", "id": "h1", "text": "t", "author": "x", "deep": '
        + b"[" * 2000
        + b"]" * 2000
        + b"}",
    ],
    ids=["empty", "null", "empty-object", "wrong-field-type", "broken-utf8", "deeply-nested"],
)
async def test_any_payload_in_a_session_is_shown_without_crashing(client: agentbus.Client, payload: bytes) -> None:
    await client.log.append("s1", step(1))
    await client.bus.publish(client.bus.ns.session_log("s1"), payload, msg_id="bad")
    await client.log.append("s1", step(2))

    records = await client.show("s1")

    assert [r.event for r in records[::2]] == [step(1), step(2)]
    assert isinstance(records[1].event, InvalidEvent | HumanMessage)


async def test_an_event_from_the_future_comes_back_as_an_unknown_event_with_its_data(
    client: agentbus.Client,
) -> None:
    future = {
        "type": "from_the_future",
        "id": "f1",
        "ts": TS,
        "v": 9,
        "hologram": {"frames": [1, 2, 3], "codec": "h.999"},
        "note": "written by agentbus 9",
    }
    await client.log.append("s1", step(1))
    await client.bus.publish(client.bus.ns.session_log("s1"), json.dumps(future).encode(), msg_id="s1:f1")
    await client.log.append("s1", step(2))

    records = await client.show("s1")
    tapped = await drain(client.tap("s1", follow=False))

    assert tapped == records
    event = records[1].event
    assert isinstance(event, UnknownEvent)
    assert (event.type, event.id, event.ts, event.v) == ("from_the_future", "f1", TS, 9)
    assert event.data == {"hologram": {"frames": [1, 2, 3], "codec": "h.999"}, "note": "written by agentbus 9"}
    assert json.loads(messages.encode(event)) == future
    assert [r.event for r in records[::2]] == [step(1), step(2)]
    assert (await client.state("s1")).events == 3


# --- prompts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["x" * 1001, "é" * 501, "x" * 100_000], ids=["1001-ascii", "1002-utf8", "100k"])
async def test_a_prompt_over_the_size_limit_is_refused_and_nothing_is_written(
    small_client: agentbus.Client, prompt: str
) -> None:
    size = len(prompt.encode())

    for pool in ("writers", None):
        with pytest.raises(agentbus.UsageError, match=rf"prompt is {size} bytes; the limit is 1000"):
            await small_client.submit(prompt, pool=pool)

    assert await nothing_was_written(small_client)


async def test_a_prompt_exactly_at_the_size_limit_is_accepted(small_client: agentbus.Client) -> None:
    sid = await small_client.submit("x" * 1000, pool="writers")

    created = (await small_client.show(sid))[0].event

    assert isinstance(created, messages.SessionCreated)
    assert created.task.prompt == "x" * 1000


@pytest.mark.parametrize("char", ['"', "\\", "\n", "\x01"], ids=["quote", "backslash", "newline", "control"])
async def test_a_prompt_within_the_limit_is_accepted_whatever_characters_it_holds(
    small_client: agentbus.Client, char: str
) -> None:
    prompt = "a" + char * 999

    sid = await small_client.submit(prompt, pool="writers")

    created = (await small_client.show(sid))[0].event
    assert isinstance(created, messages.SessionCreated)
    assert created.task.prompt == prompt


async def test_a_prompt_at_the_default_size_limit_is_accepted(client: agentbus.Client) -> None:
    limit = client.settings.max_prompt_bytes
    assert limit == Settings().max_prompt_bytes

    sid = await client.submit("x" * limit, pool="writers")

    created = (await client.show(sid))[0].event
    assert isinstance(created, messages.SessionCreated)
    assert len(created.task.prompt) == limit


@pytest.mark.parametrize("prompt", ["", " ", "\n\t  \n"], ids=["empty", "space", "whitespace"])
async def test_an_empty_prompt_is_refused_and_nothing_is_written(client: agentbus.Client, prompt: str) -> None:
    with pytest.raises(agentbus.UsageError, match="prompt is empty"):
        await client.submit(prompt, pool="writers")

    assert await nothing_was_written(client)


async def test_an_empty_human_message_is_refused(client: agentbus.Client) -> None:
    sid = await client.submit("hello", pool="writers")

    with pytest.raises(agentbus.UsageError, match="message is empty"):
        await client.say(sid, "  ")

    assert len(await client.show(sid)) == 2


# --- names that would break a subject ------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
async def test_submit_refuses_a_session_id_that_would_break_a_subject(client: agentbus.Client, bad: str) -> None:
    with pytest.raises(agentbus.UsageError, match="session id"):
        await client.submit("hello", pool="writers", session_id=bad)

    assert await nothing_was_written(client)


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
async def test_say_show_tap_and_state_refuse_a_session_id_that_would_break_a_subject(
    client: agentbus.Client, bad: str
) -> None:
    await client.submit("hello", pool="writers", session_id="real")

    with pytest.raises(agentbus.UsageError, match="session id"):
        await client.say(bad, "hello")
    with pytest.raises(agentbus.UsageError, match="session id"):
        await client.show(bad)
    with pytest.raises(agentbus.UsageError, match="session id"):
        await drain(client.tap(bad, follow=False))
    with pytest.raises(agentbus.UsageError, match="session id"):
        await drain(client.tap(bad, follow=True))
    with pytest.raises(agentbus.UsageError, match="session id"):
        await client.state(bad)
    with pytest.raises(agentbus.UsageError, match="session id"):
        await client.cancel(bad)

    assert await client.log.session_ids() == ["real"]


@pytest.mark.parametrize("good", ["a", "A-b_9", "x" * 64], ids=["one-char", "mixed", "64-chars"])
async def test_a_session_id_of_letters_digits_dash_and_underscore_is_accepted(
    client: agentbus.Client, good: str
) -> None:
    sid = await client.submit("hello", pool="writers", session_id=good)
    await client.say(sid, "hi")

    assert sid == good
    assert [r.session_id for r in await client.show(good)] == [good] * 3


@pytest.mark.parametrize("bad", BAD_POOLS, ids=repr)
async def test_submit_refuses_a_pool_name_that_would_break_a_subject(client: agentbus.Client, bad: str) -> None:
    with pytest.raises(agentbus.UsageError, match="pool name"):
        await client.submit("hello", pool=bad)

    assert await nothing_was_written(client)


async def test_submit_refuses_fewer_than_one_round(client: agentbus.Client) -> None:
    with pytest.raises(agentbus.UsageError, match="max_rounds"):
        await client.submit("hello", pool="writers", max_rounds=0)

    assert await nothing_was_written(client)


async def test_a_publish_no_stream_takes_fails_at_once_with_a_clear_reason(settings: Settings) -> None:
    patient = settings.with_(failover_s=120)  # were it taken for a failover, this would take 2 minutes
    async with await Bus.connect(patient) as bus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BusError, match="no stream stores this subject"):
            # a subject the admin may publish to, in a namespace nobody provisioned
            await bus.publish(f"{settings.prefix}x.submit", b"{}", msg_id="m1")
        assert loop.time() - started < 60


async def test_a_read_of_a_stream_that_does_not_exist_fails_at_once_with_a_clear_reason(settings: Settings) -> None:
    patient = settings.with_(failover_s=120)  # were it taken for a failover, this would take 2 minutes
    async with await Bus.connect(patient) as bus:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for limit in (None, 1):  # a batched read, and the router's single look
            with pytest.raises(BusError, match="no stream NOPE_SESSIONS"):
                await bus.read_direct("NOPE_SESSIONS", "nope.session.>", lambda d: d.seq, limit=limit)
        assert loop.time() - started < 60


async def test_a_read_nobody_answers_yet_is_asked_again_until_a_reader_of_the_stream_answers(
    settings: Settings,
) -> None:
    """503 to a direct get of a stream that exists: no replica serves reads yet (as while a
    restarted server recovers its streams). Made here with a stream that does not serve direct
    gets until it is changed to, mid-read."""
    # a subject the admin may publish to, in a namespace nobody provisioned
    name, subject = f"{settings.prefix.upper()}Z_LATE", f"{settings.prefix}z.timer"
    async with await Bus.connect(settings.with_(failover_s=30)) as bus:
        js = bus._nc.jetstream()
        await js.add_stream(name=name, subjects=[subject], allow_direct=False)
        for i in range(3):
            await js.publish(subject, str(i).encode())
        read = asyncio.create_task(bus.read_direct(name, subject, lambda d: d.data))
        await asyncio.sleep(0.5)
        assert not read.done(), "a 503 from a stream that exists is a failover, not an error"
        await js.update_stream(name=name, subjects=[subject], allow_direct=True)
        assert await asyncio.wait_for(read, 20) == [b"0", b"1", b"2"]

        with pytest.raises(BusError, match=r"did not answer within 1s .*allow_direct is off"):  # not for ever
            await js.update_stream(name=name, subjects=[subject], allow_direct=False)
            async with await Bus.connect(settings.with_(failover_s=1)) as hurried:
                await hurried.read_direct(name, subject, lambda d: d.data, limit=1)


async def test_a_reader_who_may_not_look_at_a_stream_is_not_made_to_when_nobody_answers_its_read(
    settings: Settings, as_user: AsUser, caplog: pytest.LogCaptureFixture
) -> None:
    """An observer of every session may read the state bucket with direct gets but may not look at
    the bucket's stream: a 503 is taken for a failover without a look the server would refuse (and
    log, as agentbus does, once for every retry)."""
    async with await Bus.connect(settings) as admin:
        await admin.provision()
        js = admin._nc.jetstream()
        kv_stream = f"KV_{admin.ns.state_bucket}"
        config = (await js.stream_info(kv_stream)).config
        config.allow_direct = False
        await js.update_stream(config)
        caplog.set_level(logging.INFO, logger="agentbus.bus")
        watcher = as_user("wendy", "observer").with_(failover_s=1)
        async with await Bus.connect(watcher) as bus:
            with pytest.raises(BusError, match="did not answer within 1s"):
                await bus.read_direct(kv_stream, f"$KV.{admin.ns.state_bucket}.>", lambda d: d.seq)
        config.allow_direct = True
        await js.update_stream(config)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


async def test_a_service_never_changes_replicas_of_what_exists_but_says_how_to(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Bus.connect(settings) as bus:
        await bus.provision()  # everything at one replica
    caplog.set_level(logging.WARNING, logger="agentbus.bus")
    async with await Bus.connect(settings.with_(replicas=3)) as bus:
        await bus.provision(update=True)  # on one server a count of 3 could not even be made
        sessions = await bus.stream_replicas(bus.ns.sessions_stream)
    warned = [r.getMessage() for r in caplog.records if "replica" in r.getMessage()]
    assert sessions == 1
    assert any(bus.ns.sessions_stream in w and "nats stream edit" in w for w in warned)
    assert any(f"KV_{bus.ns.workers_bucket}" in w for w in warned), "buckets are checked too"
