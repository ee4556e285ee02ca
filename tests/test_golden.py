"""Golden files: today's wire bytes of one message of every kind, so any change to the wire is a visible diff.

`tests/golden/<family>/<kind>.json` holds exactly what `messages.encode` writes for the example of
that kind in `agentbus.schema` (and a newline). A change to a wire type, to the encoder or to an
example fails here; if it is meant, regenerate with `AGENTBUS_UPDATE_GOLDEN=1 pytest tests/test_golden.py`
and let the diff of the golden files show what changed on the wire.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from agentbus import messages
from agentbus.schema import EXAMPLES, kind

GOLDEN = Path(__file__).parent / "golden"
CASES = [(family, example) for family, examples in EXAMPLES.items() for example in examples]


def _path(family: str, example: msgspec.Struct) -> Path:
    return GOLDEN / family / f"{kind(example)}.json"


@pytest.mark.parametrize(("family", "example"), CASES, ids=[f"{f}/{kind(e)}" for f, e in CASES])
def test_the_wire_bytes_of_every_message_kind_are_the_golden_ones(family: str, example: msgspec.Struct) -> None:
    path = _path(family, example)
    wire = messages.encode(example) + b"\n"
    if os.environ.get("AGENTBUS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wire)

    assert path.exists(), f"no golden file {path}: run AGENTBUS_UPDATE_GOLDEN=1 pytest {__file__}"
    assert wire == path.read_bytes(), f"the wire form of {kind(example)} changed (see {path})"


@pytest.mark.parametrize(("family", "example"), CASES, ids=[f"{f}/{kind(e)}" for f, e in CASES])
def test_every_golden_file_decodes_back_to_its_example(family: str, example: msgspec.Struct) -> None:
    data = _path(family, example).read_bytes()

    decoded = messages.decode_event(data) if family == "events" else msgspec.json.decode(data, type=type(example))

    assert decoded == example


def test_there_is_one_golden_file_per_message_kind_and_no_other() -> None:
    expected = {_path(f, e).relative_to(GOLDEN) for f, e in CASES}

    assert {p.relative_to(GOLDEN) for p in GOLDEN.rglob("*.json")} == expected


def test_every_event_type_has_an_example() -> None:
    assert {kind(e) for e in EXAMPLES["events"]} == set(messages.EVENT_TYPES)
