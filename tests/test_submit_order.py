"""A submit cannot half-happen: a work item that lands before its session waits for it, retried submits
converge, and a session that can never start ends `failed` with the reason instead of staying pending."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

import agentbus
from agentbus import queues
from agentbus.config import Settings
from agentbus.messages import InputRejected, SessionClaimed, SessionEnded, Task, WorkItem, encode
from agentbus.testing import FakeMessagesAPI, text_response
from tests.helpers import POOL, agent, until


async def test_a_work_item_published_before_its_session_waits_and_the_session_then_completes(
    client: agentbus.Client, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentbus.queues")
    sid = "late-session"
    with FakeMessagesAPI() as api:
        api.script([text_response("done late")])
        async with agent(settings, api, tmp_path):
            # a writer in another language, out of order: the work item first ...
            await client.bus.publish(client.bus.ns.work(POOL), encode(WorkItem(session_id=sid)), msg_id=f"{sid}:new:1")
            await until(lambda: _logged(caplog, "its work item waits (2)"), "the item to wait twice", timeout=30)
            # ... the session's records seconds later: a submit retried with the same ids
            assert await client.submit("finish late", pool=POOL, session_id=sid) == sid
            state = await client.wait(sid, timeout=30)

    records = await client.show(sid)
    assert state.status == "completed" and state.result == "done late"
    assert len([r for r in records if isinstance(r.event, SessionClaimed)]) == 1
    assert len([r for r in records if isinstance(r.event, SessionEnded)]) == 1


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_work_item_whose_session_never_appears_is_dropped_after_the_hold_and_writes_nothing(
    client: agentbus.Client, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    hold = client.queues.unseen_hold_s()
    assert hold >= 120  # the work streams' dedup window and a margin
    monkeypatch.setattr(queues, "UNSEEN_MARGIN_S", 2.0 - hold + queues.UNSEEN_MARGIN_S)  # a 2 s hold, for the test
    caplog.set_level(logging.WARNING)
    ns = client.bus.ns
    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path):
            await client.bus.publish(ns.work(POOL), encode(WorkItem(session_id="never")), msg_id="never:new:1")
            await until(lambda: _logged(caplog, "still has nothing in the log"), "the item's rejection", timeout=30)
            await until(lambda: _empty(client), "the work queue to be empty", timeout=10)

    assert await client.log.session_ids() == []
    assert api.requests == []


async def _empty(client: agentbus.Client) -> bool:
    ns = client.bus.ns
    return await client.bus.next_stored(ns.work_stream, ns.work(POOL)) is None


async def test_a_session_whose_first_record_is_not_a_valid_session_created_ends_failed_saying_why(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    sid = "ms-clock"
    task = msgspec.to_builtins(Task(session_id=sid, prompt="hello", pool=POOL))
    created = {"type": "session_created", "id": "created", "ts": time.time() * 1000, "task": task}
    ns = client.bus.ns
    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path):
            await client.bus.publish(ns.session_control(sid, client.bus.user), json.dumps(created).encode(),
                                     msg_id=f"{sid}:created")  # fmt: skip
            await client.bus.publish(ns.work(POOL), encode(WorkItem(session_id=sid)), msg_id=f"{sid}:new:1")
            state = await client.wait(sid, timeout=30)

    events = [r.event for r in await client.show(sid)]
    assert state.status == "failed"
    assert state.reason.startswith("no task: its first record is invalid") and "not seconds" in state.reason
    assert any(isinstance(e, InputRejected) and "cannot start" in e.reason for e in events)
    assert api.requests == []


async def test_a_submit_repeated_with_the_same_ids_records_and_queues_once(client: agentbus.Client) -> None:
    sid = await client.submit("once", pool=POOL, session_id="twice")
    await client.submit("once", pool=POOL, session_id=sid)
    ns = client.bus.ns

    records = await client.show(sid)
    stored = await client.bus.subject_counts(ns.work_stream, ns.work(POOL))

    assert [type(r.event).__name__ for r in records] == ["SessionCreated", "Routed"]
    assert stored == {ns.work(POOL): 1}


async def test_a_submission_whose_creation_is_refused_says_so_even_though_its_item_went_out(
    client: agentbus.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's item goes right behind the creation, not after its ack: when the stream refuses
    the creation the submit still fails with the server's reason (its item waits for a session that
    never comes, and is dropped after the hold, as any item without one)."""
    from nats.aio.msg import Msg

    from agentbus.errors import BusError

    bus = client.bus
    real = bus.ask_together

    async def refused(requests: list[tuple[str, bytes, dict[str, str]]], timeout: float) -> list[Any]:
        answers: list[Any] = await real(requests, timeout)
        error = b'{"error":{"code":400,"err_code":10999,"description":"the test says no"}}'
        return [Msg(_client=bus._nc, subject=answers[0].subject, data=error), *answers[1:]]

    monkeypatch.setattr(bus, "ask_together", refused)
    with pytest.raises(BusError, match=r"control\..*refused: the test says no"):
        await client.submit("anything")
    jobs = await (await bus.pull(bus.ns.router_consumer())).fetch(1, timeout=2.0)
    assert len(jobs) == 1  # the item went out
