"""The wire contract as data: a JSON Schema per payload family, generated from the wire types, and one
example of every message kind.

`schemas/` at the repository root holds `generate()`'s output (`make schemas` writes it,
`tests/test_schema.py` fails when it differs); `agentbus schema` prints it; subjects.md shows the
examples, and tests/golden/ pins their bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from agentbus.schema import _examples
from agentbus.schema._generate import FAMILIES, RECORDS, Family, check_notes, dumps, generate

# family name -> one example of each message kind it holds, in the order subjects.md shows them
EXAMPLES: dict[str, tuple[msgspec.Struct, ...]] = {
    "events": _examples.EVENTS,
    "work": _examples.WORK,
    "timers": _examples.TIMERS,
    "state": _examples.STATE,
    "registry": _examples.REGISTRY,
    "spend": _examples.SPEND,
    "scale": _examples.SCALE,
}


def kind(example: msgspec.Struct) -> str:
    """A message kind's name: an event's `type`, else its type's name in snake case (`work_item`)."""
    tag = type(example).__struct_config__.tag
    if isinstance(tag, str):
        return tag
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(example).__name__).lower()


def write(directory: Path) -> list[Path]:
    """Write every schema file into `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in generate().items():
        path = directory / f"{name}.schema.json"
        path.write_text(dumps(schema))
        paths.append(path)
    return paths


__all__ = ["EXAMPLES", "FAMILIES", "RECORDS", "Family", "check_notes", "dumps", "generate", "kind", "write"]
