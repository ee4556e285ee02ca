"""The wire contract as data: the payload families, one example of every message kind, and (soon) their schemas."""

from __future__ import annotations

import re

import msgspec

from agentbus.schema import _examples

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


__all__ = ["EXAMPLES", "kind"]
