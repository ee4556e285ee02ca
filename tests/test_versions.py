"""Schema versions on the wire: every message says its version, a missing one means 1, newer ones pass through."""

from __future__ import annotations

import json

import msgspec
import pytest

from agentbus import messages, render
from agentbus.messages import HumanMessage, InvalidEvent, Record, SessionCreated, UnknownEvent, WorkItem, _wire
from agentbus.schema import EXAMPLES, kind

TS = 1767225600.5
ALL = [example for examples in EXAMPLES.values() for example in examples]
VERSIONED = [e for e in ALL if "v" in {f.name for f in msgspec.structs.fields(type(e))}]


def test_only_the_unstored_and_derived_payloads_go_without_a_version() -> None:
    # scale requests and replies are core request/reply, never stored; the state cache is a fold
    # that readers check against the log, never the record
    assert {kind(e) for e in ALL} - {kind(e) for e in VERSIONED} == {"scale_request", "scale_reply", "session_state"}


@pytest.mark.parametrize("example", VERSIONED, ids=kind)
def test_every_versioned_message_carries_its_version_on_the_wire(example: msgspec.Struct) -> None:
    assert json.loads(messages.encode(example))["v"] == messages.SCHEMA_VERSION


def test_a_message_without_a_version_is_read_as_version_1_even_by_a_newer_agentbus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_wire, "SCHEMA_VERSION", 2)
    written = HumanMessage(id="say-1", ts=TS, text="hi", author="ann")

    read = messages.decode_event(b'{"type":"human_message","id":"say-1","ts":1767225600.5,"text":"hi","author":"a"}')
    item = messages.decode_work(b'{"session_id":"s1"}')

    assert written.v == 2
    assert isinstance(read, HumanMessage) and read.v == 1
    assert item.v == 1


def test_an_event_of_a_newer_version_with_fields_this_one_lacks_still_decodes_as_its_type() -> None:
    data = {"type": "human_message", "id": "say-1", "ts": TS, "v": 7, "text": "hi", "author": "ann",
            "language": "en", "attachments": [{"name": "a.png"}]}  # fmt: skip

    event = messages.decode_event(json.dumps(data).encode())

    assert event == HumanMessage(id="say-1", ts=TS, v=7, text="hi", author="ann")


def test_a_known_type_from_a_newer_version_that_does_not_decode_here_is_passed_through() -> None:
    data = {"type": "human_message", "id": "say-1", "ts": TS, "v": 2, "text": {"parts": ["hi"]}, "author": "ann"}

    event = messages.decode_event(json.dumps(data).encode())

    assert isinstance(event, UnknownEvent)
    assert (event.type, event.v, event.newer) == ("human_message", 2, True)
    assert "from a newer agentbus (v2" in event.describe()
    assert json.loads(messages.encode(event)) == data


def test_the_same_payload_at_this_version_is_invalid_and_says_why() -> None:
    data = {"type": "human_message", "id": "say-1", "ts": TS, "v": 1, "text": {"parts": ["hi"]}, "author": "ann"}

    event = messages.decode_event(json.dumps(data).encode())

    assert isinstance(event, InvalidEvent)
    assert "$.text" in event.reason


@pytest.mark.parametrize("version", [None, 1])
def test_a_misspelled_event_type_is_called_that_with_the_nearest_known_type(version: int | None) -> None:
    data = {"type": "human_mesage", "id": "say-1", "ts": TS, "text": "hi", "author": "ann"}
    if version is not None:
        data["v"] = version

    event = messages.decode_event(json.dumps(data).encode())
    line = render.record_line(Record(seq=4, session_id="s1", channel="input", event=event, sender="ann"))

    assert isinstance(event, UnknownEvent) and not event.newer
    assert event.describe() == "unknown event type 'human_mesage' (v1); did you mean 'human_message'?"
    assert "did you mean 'human_message'" in line
    assert "newer" not in line


def test_an_unknown_type_of_a_newer_version_says_so() -> None:
    event = messages.decode_event(json.dumps({"type": "hologram_sent", "id": "h1", "ts": TS, "v": 3}).encode())

    assert isinstance(event, UnknownEvent) and event.newer
    assert event.describe().startswith("hologram_sent from a newer agentbus (v3")


def test_a_work_item_of_a_newer_version_with_new_fields_still_decodes() -> None:
    item = messages.decode_work(b'{"session_id":"s1","reason":"new","round":1,"v":4,"priority":"high"}')

    assert item == WorkItem(session_id="s1", v=4)


def test_nested_payloads_carry_their_version_too() -> None:
    created = EXAMPLES["events"][0]
    assert isinstance(created, SessionCreated)

    assert json.loads(messages.encode(created))["task"]["v"] == messages.SCHEMA_VERSION
