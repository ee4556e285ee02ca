"""schemas/ is generated from the wire types: the files, the code, the examples and the golden bytes agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from click.testing import CliRunner
from referencing import Registry, Resource

from agentbus import messages
from agentbus.cli import main
from agentbus.messages import InvalidEvent, Record, UnknownEvent
from agentbus.schema import EXAMPLES, FAMILIES, check_notes, dumps, generate, kind

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
GENERATED = generate()


def validator(family: str) -> jsonschema.Draft202012Validator:
    """A validator for one family that resolves the others by their `$id` (records refer to events)."""
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in GENERATED.values()
    )
    return jsonschema.Draft202012Validator(GENERATED[family], registry=registry)


def test_schemas_on_disk_are_what_the_code_generates() -> None:
    on_disk = {p.name.removesuffix(".schema.json"): p.read_text() for p in SCHEMAS.glob("*.schema.json")}

    assert set(on_disk) == set(GENERATED), "run `make schemas`"
    for name, schema in GENERATED.items():
        assert on_disk[name] == dumps(schema), f"schemas/{name}.schema.json is out of date: run `make schemas`"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_every_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(GENERATED[name])


def test_every_field_note_names_a_field_that_exists() -> None:
    assert check_notes() == []


CASES = [(family.name, example) for family in FAMILIES for example in EXAMPLES[family.name]]


@pytest.mark.parametrize(("family", "example"), CASES, ids=[f"{f}/{kind(e)}" for f, e in CASES])
def test_every_example_on_the_wire_is_valid_by_its_schema(family: str, example: msgspec.Struct) -> None:
    validator(family).validate(json.loads(messages.encode(example)))


def test_every_event_type_has_a_definition_with_its_tag() -> None:
    tags = {
        d["properties"]["type"]["enum"][0]
        for d in GENERATED["events"]["$defs"].values()
        if "type" in d.get("properties", {})
    }

    assert tags == set(messages.EVENT_TYPES)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"type": "human_message", "id": "say-1", "ts": 1767225600500, "text": "hi", "author": "a"}, "milliseconds"),
        ({"type": "human_mesage", "id": "say-1", "ts": 1767225600.5, "text": "hi", "author": "a"}, "misspelled"),
        ({"type": "human_message", "id": "say-1", "ts": 1767225600.5, "text": "hi"}, "no author"),
        ({"type": "human_message", "id": "say-1", "text": "hi", "author": "a", "mode": "shout"}, "bad mode"),
        ({"type": "human_message", "id": "say-1", "text": "hi", "author": "a", "v": 0}, "version 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_what_agentbus_refuses_the_schema_refuses_too(payload: dict[str, Any], why: str) -> None:
    assert not validator("events").is_valid(payload)
    assert not isinstance(messages.decode_event(json.dumps(payload).encode()), messages.HumanMessage)


def test_a_work_item_of_only_a_session_id_is_valid_and_means_a_new_round_1() -> None:
    validator("work").validate({"session_id": "01kdvdnafmq3v8ze"})
    work = GENERATED["work"]["$defs"]["WorkItem"]["properties"]

    assert (work["reason"]["default"], work["round"]["default"]) == ("new", 1)
    assert not validator("work").is_valid({"session_id": "a.b"})


@pytest.mark.parametrize(
    "event",
    [
        *EXAMPLES["events"],
        UnknownEvent(type="from_later", id="x", ts=1767225600.5, v=3, data={"a": 1}),
        InvalidEvent(reason="not JSON", raw="\xff", ts=1767225600.5),
    ],
    ids=lambda e: messages.event_type(e),
)
def test_what_tap_json_prints_is_valid_by_the_records_schema(event: messages.LogEvent) -> None:
    record = Record(seq=12, session_id="01kdvdnafmq3v8ze", channel="input", event=event, sender="ann")

    validator("records").validate(json.loads(json.dumps(messages.to_builtins(record))))


def test_agentbus_schema_json_prints_what_schemas_holds() -> None:
    one = CliRunner().invoke(main, ["schema", "--json", "work"])
    every = CliRunner().invoke(main, ["schema", "--json"])

    assert one.exit_code == 0 and one.stdout == (SCHEMAS / "work.schema.json").read_text()
    assert every.exit_code == 0 and set(json.loads(every.stdout)) == set(GENERATED)


def test_agentbus_schema_lists_every_family_and_the_fields_of_one() -> None:
    listing = CliRunner().invoke(main, ["schema"])
    fields = CliRunner().invoke(main, ["schema", "events"])

    assert listing.exit_code == 0
    for name in GENERATED:
        assert f"schemas/{name}.schema.json" in listing.stdout
    assert fields.exit_code == 0
    assert "HumanMessage" in fields.stdout and "seconds since the epoch" in fields.stdout
    assert CliRunner().invoke(main, ["schema", "nonsense"]).exit_code == 2
