"""What every payload shares on the wire: its schema version, and defaults that differ for writers and readers.

A writer's new message carries this version's `SCHEMA_VERSION`; a reader decoding one that
lacks `v` takes it for version 1 (what every message written before `v` went on the wire was).
The two differ only once the version goes up, so the defaults are factories that ask whether a
decode is under way (`reading()`), not constants.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
"""This version's schema. It goes up when a reader of the previous version would misread a message
(a field's meaning changes); a new event type or a new field with a default needs no new version."""

MISSING_VERSION = 1  # a message without `v` predates it: version 1

READING: contextvars.ContextVar[bool] = contextvars.ContextVar("agentbus_reading", default=False)
"""Set while bytes from the wire are decoded (the codec sets it around each decode)."""

Version = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        description="schema version of this message; readers take a missing `v` for 1 and read newer "
        "versions as far as they can (unknown fields are ignored)",
    ),
]


def version() -> int:
    """`v` of a message: this version's when written, 1 when a message read from the wire lacks it."""
    return MISSING_VERSION if READING.get() else SCHEMA_VERSION


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Defaults inside are a reader's: what a missing field meant when it was written."""
    token = READING.set(True)
    try:
        yield
    finally:
        READING.reset(token)
