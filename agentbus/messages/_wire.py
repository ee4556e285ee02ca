"""What every payload shares on the wire: its schema version, and defaults that differ for writers and readers.

A writer's new message carries this version's `SCHEMA_VERSION`; a reader decoding one that
lacks `v` takes it for version 1 (what every message written before `v` went on the wire was).
The two differ only once the version goes up, so the defaults are factories that ask whether a
decode is under way (`reading()`), not constants.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Annotated

import msgspec

SCHEMA_VERSION = 1
"""This version's schema. It goes up when a reader of the previous version would misread a message
(a field's meaning changes); a new event type or a new field with a default needs no new version."""

MISSING_VERSION = 1  # a message without `v` predates it: version 1
MISSING_TS = -1.0  # what a read event without `ts` holds until the reader gives it the stream's timestamp

# Timestamps are seconds since the epoch, as a float. Anything outside these bounds (before 2001,
# after 2286) is not plausible seconds: milliseconds (`Date.now()`) are a thousand times too big.
TS_MIN = 1e9
TS_MAX = 1e10

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

EpochSeconds = Annotated[
    float,
    msgspec.Meta(
        ge=TS_MIN,
        lt=TS_MAX,
        description="seconds since the Unix epoch, a float (in JavaScript: Date.now() / 1000); "
        "a value that is not plausible seconds (milliseconds, say) is refused",
    ),
]
EpochSecondsOrUnset = Annotated[
    float,
    msgspec.Meta(ge=0, lt=TS_MAX, description="seconds since the Unix epoch, a float; 0 when not known"),
]
Seconds = Annotated[float, msgspec.Meta(ge=0, description="a duration in seconds")]


def version() -> int:
    """`v` of a message: this version's when written, 1 when a message read from the wire lacks it."""
    return MISSING_VERSION if READING.get() else SCHEMA_VERSION


def now() -> float:
    """`ts` of an event: the writer's clock when written; `MISSING_TS` when one read from the wire
    lacks it (the reader then takes the time the stream stored it, the same for every reader)."""
    return MISSING_TS if READING.get() else time.time()


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """Defaults inside are a reader's: what a missing field meant when it was written."""
    token = READING.set(True)
    try:
        yield
    finally:
        READING.reset(token)
