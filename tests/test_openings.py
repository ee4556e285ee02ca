"""The opening a routed work item carries (`agentbus.openings`): a fresh session's first records,
signed, so the agent starts it without reading it back. What it stands for must be exactly what a
read gives; a forged, tampered or stale one, or anything written since the route, must make the
agent read the session as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

import agentbus
from agentbus import openings
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.errors import NotPermitted
from agentbus.messages import Budget, Opening, Routed, SessionCreated, Task, WorkItem, decode_work, encode
from agentbus.testing import FakeMessagesAPI, text_response
from services.agent.transcript import Transcript
from services.router.router import Router
from services.router.routes import RouteTable
from tests.helpers import POOL, agent, until


@asynccontextmanager
async def routing(settings: Settings) -> AsyncIterator[Router]:
    bus = await Bus.connect(settings, name="test-router")
    router = Router(bus, RouteTable(default_pool=POOL))
    task = asyncio.create_task(router.run())
    try:
        yield router
    finally:
        await router.shutdown()
        await task
        await bus.close()


async def _routed(client: agentbus.Client, sid: str) -> None:
    async def routed() -> bool:
        return any(isinstance(r.event, Routed) for r in await client.show(sid))

    await until(routed, f"{sid} routed", timeout=15)


async def _queued(client: agentbus.Client) -> WorkItem:
    """The work item waiting on the pool's queue (looked at, not taken)."""
    ns = client.bus.ns
    stored = await until(lambda: client.bus.next_stored(ns.work_stream, ns.work(POOL)), "a queued work item")
    return decode_work(stored.data)


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """How each run began: ("open", sid) from its work item's opening, ("load", sid) from a read."""
    seen: list[tuple[str, str]] = []
    real_open, real_load = Transcript.open, Transcript.load

    def open_(self: Transcript, records: Any) -> None:
        seen.append(("open", self.sid))
        real_open(self, records)

    async def load(self: Transcript) -> None:
        seen.append(("load", self.sid))
        await real_load(self)

    monkeypatch.setattr(Transcript, "open", open_)
    monkeypatch.setattr(Transcript, "load", load)
    return seen


def _prompts(api: FakeMessagesAPI) -> list[str]:
    return [str(body["messages"]) for body, _ in api.requests]


async def test_the_opening_stands_for_exactly_the_records_a_read_gives(
    client: agentbus.Client, settings: Settings, as_user: Callable[..., Settings]
) -> None:
    olga = as_user("olga", "operator")
    async with routing(settings), agentbus.connect(settings=olga) as submitter:
        sid = await submitter.submit(
            'the task, with ünïcode and "quotes"',
            criteria=["it is done"],
            budget=Budget(max_steps=7, max_usd=0.5),
            tags=["x"],
            submitter="olga's bot",  # a claimed name: the read shows it beside the sender
            approve=["bash"],
        )
        await _routed(client, sid)
        item = await _queued(client)

    assert item.opening is not None
    read = await client.log.read(sid)
    opened = await openings.opened(openings.WorkKey(client.bus), client.bus, sid, item.opening)
    assert opened == read
    assert read[0].sender == olga_name(olga) and read[0].channel == "control"
    assert "olga's bot" in read[0].event.task.submitter  # type: ignore[union-attr]


def olga_name(settings: Settings) -> str:
    return Path(settings.creds or "").stem


async def test_a_tampered_or_misplaced_opening_stands_for_nothing(client: agentbus.Client, settings: Settings) -> None:
    async with routing(settings):
        sid = await client.submit("the real task")
        await _routed(client, sid)
        item = await _queued(client)
    opening = item.opening
    assert opening is not None
    key = openings.WorkKey(client.bus)
    forged = bytes(opening.created).replace(b"the real task", b"a forged task")
    tampered = [
        msgspec.structs.replace(opening, created=msgspec.Raw(forged)),
        msgspec.structs.replace(opening, created_seq=opening.created_seq + 1),
        msgspec.structs.replace(opening, sender="someone-else"),
        msgspec.structs.replace(opening, routed_seq=opening.routed_seq + 1),
        msgspec.structs.replace(opening, mac="0" * 64),
    ]
    for bad in tampered:
        assert await openings.opened(key, client.bus, sid, bad) is None, bad
    assert await openings.opened(key, client.bus, "another-session", opening) is None
    assert await openings.opened(key, client.bus, sid, opening) is not None


async def test_a_routed_session_starts_without_a_read_and_runs_as_it_would_have(
    client: agentbus.Client, settings: Settings, tmp_path: Path, starts: list[tuple[str, str]]
) -> None:
    with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
        async with routing(settings), agent(settings, api, tmp_path) as worker:
            await until(lambda: worker._context.work_key.get(), "the agent's work key")  # type: ignore[union-attr]
            sid = await client.submit("a task")
            state = await client.wait(sid, timeout=30)
            plain = await client.submit("a task", pool=POOL)  # no router: no opening
            plain_state = await client.wait(plain, timeout=30)
    assert state.status == plain_state.status == "completed"
    assert starts == [("open", sid), ("load", plain)]
    first, other = (body for body, _ in api.requests)
    same = ("messages", "system", "tools", "model", "max_tokens")
    assert {k: first.get(k) for k in same} == {k: other.get(k) for k in same}
    assert "a task" in str(first["messages"])
    assert [type(r.event).__name__ for r in await client.show(sid)][:3] == [
        "SessionCreated", "Routed", "SessionClaimed"
    ]  # fmt: skip


async def _has_claim(client: agentbus.Client, sid: str) -> bool:
    return any(type(r.event).__name__ == "SessionClaimed" for r in await client.show(sid))


async def test_a_message_sent_after_the_route_and_before_the_pickup_is_read_and_heard(
    client: agentbus.Client, settings: Settings, tmp_path: Path, starts: list[tuple[str, str]]
) -> None:
    async with routing(settings):
        sid = await client.submit("the task")
        await _routed(client, sid)
        assert (await _queued(client)).opening is not None  # the fence at the claim is what is tested
        await client.say(sid, "and mind the second thing")
        with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
            async with agent(settings, api, tmp_path):
                state = await client.wait(sid, timeout=30)
    assert state.status == "completed"
    assert "mind the second thing" in _prompts(api)[0]
    assert starts == [("open", sid), ("load", sid)], "the claim on the opening was fenced: read, then claimed"
    claims = [r for r in await client.show(sid) if type(r.event).__name__ == "SessionClaimed"]
    assert len(claims) == 1


async def test_a_message_sent_before_the_route_leaves_the_work_item_without_an_opening(
    client: agentbus.Client, settings: Settings, tmp_path: Path, starts: list[tuple[str, str]]
) -> None:
    sid = await client.submit("the task")  # no router yet
    await client.say(sid, "and mind the first thing")
    async with routing(settings):
        await _routed(client, sid)
        assert (await _queued(client)).opening is None
        with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
            async with agent(settings, api, tmp_path):
                state = await client.wait(sid, timeout=30)
    assert state.status == "completed"
    assert "mind the first thing" in _prompts(api)[0]
    assert starts == [("load", sid)]


async def test_a_forged_opening_from_a_submitter_is_not_believed(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    as_user: Callable[..., Settings],
    starts: list[tuple[str, str]],
) -> None:
    async with routing(settings):  # the key exists
        await until(lambda: openings.WorkKey(client.bus).get(), "the work key")
    # a session recorded as `submit --pool` records it, with no work item: the forged one is its only
    sid = "forged-opening"
    task = Task(session_id=sid, prompt="the real task", pool=POOL, submitter=client.bus.user)
    await client.log.append(sid, SessionCreated(id="created", task=task), channel="control")
    await client.log.append(sid, Routed(id="routed", pool=POOL, rule="explicit"), channel="control")
    created, last = await client.log.read(sid)
    forged_task = encode(msgspec.structs.replace(created.event, task=msgspec.structs.replace(
        created.event.task, prompt="a forged task")))  # type: ignore[union-attr]  # fmt: skip
    routed = encode(Routed(id="routed", pool=POOL, rule="explicit"))
    # as good as a forgery gets: the sequences are right, so the claim's fence would hold
    forged = Opening(created_seq=created.seq, sender=created.sender, created=msgspec.Raw(forged_task),
                     routed_seq=last.seq, routed=msgspec.Raw(routed), mac="ab" * 32)  # fmt: skip
    olga = as_user("olga", "operator")
    async with agentbus.connect(settings=olga) as mallory:
        ns = mallory.bus.ns
        item = WorkItem(session_id=sid, opening=forged)
        await mallory.bus.publish(ns.work(POOL), encode(item), msg_id=f"{sid}:forged")
        with pytest.raises(NotPermitted):  # nor may it read the key to sign with
            await mallory.bus.kv_get(ns.keys_bucket, openings.KEY)
    with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
        async with agent(settings, api, tmp_path):
            state = await client.wait(sid, timeout=30)
    assert state.status == "completed"
    prompts = _prompts(api)
    assert prompts and all("a forged task" not in p for p in prompts)
    assert "the real task" in prompts[0]
    assert starts == [("load", sid)]


async def test_a_genuine_work_item_queued_again_later_changes_nothing(
    client: agentbus.Client, settings: Settings, tmp_path: Path, starts: list[tuple[str, str]]
) -> None:
    with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
        async with routing(settings):
            sid = await client.submit("the task")
            await _routed(client, sid)
            item = await _queued(client)
            async with agent(settings, api, tmp_path):
                await client.wait(sid, timeout=30)
                before = await client.log.read(sid)
                # the same item again (an operator may read the work stream and queue work)
                await client.bus.publish(client.bus.ns.work(POOL), encode(item), msg_id=f"{sid}:again")
                await until(lambda: _taken(client), "the item taken again")
                await asyncio.sleep(0.3)
    assert item.opening is not None
    assert starts[0] == ("open", sid) and starts[1:] == [("open", sid), ("load", sid)]
    assert len(api.requests) == 1, "the ended session was not run again"
    assert await client.log.read(sid) == before


async def _taken(client: agentbus.Client) -> bool:
    ns = client.bus.ns
    return await client.bus.next_stored(ns.work_stream, ns.work(POOL)) is None


async def test_an_agent_holding_a_replaced_key_asks_for_the_new_one(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    starts: list[tuple[str, str]],
) -> None:
    monkeypatch.setattr(openings, "_RETRY_S", 0.0)
    async with routing(settings) as router:
        old = await until(lambda: router.key.get(), "the first key")
    await client.bus.kv_delete(client.bus.ns.keys_bucket, openings.KEY)  # how a key is replaced
    with FakeMessagesAPI(responder=lambda _: text_response("done")) as api:
        async with routing(settings) as router, agent(settings, api, tmp_path) as worker:
            new = await until(lambda: router.key.get(), "the new key")
            key = worker._context.work_key
            assert key is not None and new != old
            await until(lambda: key.get(), "the agent's key")
            key._key = old  # as if it had started before the change
            sid = await client.submit("after the key changed")
            state = await client.wait(sid, timeout=30)
    assert state.status == "completed"
    assert key._key == new
    assert starts == [("open", sid)]


def test_the_mac_recipe_subjects_md_gives_signs_its_example_as_the_code_does() -> None:
    """What a client in another language does: the recipe, on the example's bytes, by hand."""
    import hashlib
    import hmac
    import json

    from tests.test_subjects_doc import _examples_shown

    [item] = [w for w in _examples_shown()["work"] if "opening" in w]
    o = item["opening"]

    def stored(payload: dict[str, Any]) -> bytes:  # as the stream holds it: compact JSON
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()

    created, routed = stored(o["created"]), stored(o["routed"])
    head = f"agentbus opening 1\n{item['session_id']}\n{o['created_seq']}\n{o['sender']}\n{o['routed_seq']}\n"
    message = head.encode() + f"{len(created)}\n".encode() + created + routed
    assert hmac.new(bytes(32), message, hashlib.sha256).hexdigest() == o["mac"]


async def test_people_s_records_count_as_known_only_up_to_the_opening_s_creation(client: agentbus.Client) -> None:
    """On a replicated stream a person's message still being replicated can land between the
    creation and the route (a fence on a wildcard is checked against what is stored): the next
    look must still find it."""
    sid = "between"
    task = Task(session_id=sid, prompt="p", submitter=client.bus.user)
    await client.log.append(sid, SessionCreated(id="created", task=task), channel="control")
    await client.say(sid, "said in between")
    await client.log.append(sid, Routed(id="routed", pool=POOL, rule="default"))
    created, said, routed = await client.log.read(sid)

    transcript = Transcript(client.log, sid)
    transcript.open([created, routed])
    assert await transcript.catch_up(force=True)
    assert transcript.records == [created, said, routed]


def test_a_work_item_whose_opening_does_not_decode_is_still_its_work_item() -> None:
    for opening in ('{"created_seq": "5"}', '"text"', '{"mac": 1}', "[1, 2]"):
        data = f'{{"session_id": "s1", "reason": "new", "round": 2, "opening": {opening}}}'.encode()
        item = decode_work(data)
        assert (item.session_id, item.reason, item.round, item.opening) == ("s1", "new", 2, None)
    with pytest.raises(msgspec.ValidationError):
        decode_work(b'{"session_id": "s1", "reason": "nonsense", "opening": {"created_seq": "5"}}')


async def test_an_opening_with_an_odd_mac_or_payload_is_no_opening_and_no_crash(
    client: agentbus.Client, settings: Settings
) -> None:
    async with routing(settings):
        sid = await client.submit("the real task")
        await _routed(client, sid)
        item = await _queued(client)
    assert item.opening is not None
    key = openings.WorkKey(client.bus)
    no_ts = bytes(item.opening.created).replace(b'"ts":', b'"tz":')
    for bad in (
        msgspec.structs.replace(item.opening, mac="é" * 64),
        msgspec.structs.replace(item.opening, mac=item.opening.mac.upper()),
        msgspec.structs.replace(item.opening, mac=item.opening.mac[:-1]),
        msgspec.structs.replace(item.opening, created=msgspec.Raw(no_ts)),
    ):
        assert await openings.opened(key, client.bus, sid, bad) is None


async def test_only_a_compact_small_stamped_creation_on_a_control_channel_is_signed(client: agentbus.Client) -> None:
    from agentbus.bus import Delivery

    key = openings.WorkKey(client.bus, make=True)
    assert await key.get() is not None
    routed = Routed(id="routed", pool=POOL)
    good = encode(SessionCreated(id="created", task=Task(session_id="s1", prompt="p")))
    control = client.bus.ns.session_control("s1", "ann")

    async def signs(subject: str, data: bytes) -> bool:
        return (
            await openings.sign(key, "s1", Delivery(subject, data, b"", 1, 0, 0), routed, encode(routed), 2) is not None
        )

    assert await signs(control, good)
    assert not await signs(client.bus.ns.session_log("s1"), good)  # not a person's creation
    assert not await signs(control, good + b"\n")  # an embedded payload would lose the newline
    assert not await signs(control, good.replace(b'"ts":', b'"tz":'))  # its time would be the stream's
    big = encode(SessionCreated(id="created", task=Task(session_id="s1", prompt="x" * openings.MAX_CREATED_BYTES)))
    assert not await signs(control, big)


async def test_a_reader_the_server_refuses_the_key_gets_none_and_one_warning(
    as_user: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    async with agentbus.connect(settings=as_user("obs", "observer")) as watcher:
        key = openings.WorkKey(watcher.bus)
        assert await key.get() is None
        key._asked = float("-inf")
        assert await key.get() is None
    said = [r for r in caplog.records if "work key cannot be read" in r.getMessage() and r.levelname == "WARNING"]
    assert len(said) == 1


def test_a_whole_session_fence_is_only_asked_of_servers_that_take_it() -> None:
    from agentbus.bus._core import _fences_on_wildcards

    assert _fences_on_wildcards("2.11.0") and _fences_on_wildcards("2.15.1") and _fences_on_wildcards("3.0.0")
    assert not _fences_on_wildcards("2.10.29") and not _fences_on_wildcards("") and not _fences_on_wildcards("x")


async def test_on_a_server_before_2_11_the_router_sends_no_opening(
    client: agentbus.Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an older server ignores the -Subject header and fences on the published subject instead
    monkeypatch.setattr(Bus, "fences_on_wildcards", property(lambda self: False))
    async with routing(settings):
        sid = await client.submit("the task")
        await _routed(client, sid)
        item = await _queued(client)
    assert item.opening is None
    assert [type(r.event).__name__ for r in await client.show(sid)] == ["SessionCreated", "Routed"]
