"""What a reader gets back from the log: an event it knows, one it does not, or bytes that are no event."""

from __future__ import annotations

import difflib
from typing import Any

import msgspec

from agentbus.messages._events import EVENT_TYPES, AnyEvent
from agentbus.messages._wire import MISSING_VERSION, SCHEMA_VERSION


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event this version cannot read as one it knows: a type it does not know, or a known type
    written by a newer version in a form this one cannot decode. Kept, passed through, never dropped."""

    type: str
    id: str = ""
    ts: float = 0.0
    v: int = MISSING_VERSION
    data: dict[str, Any] = {}

    @property
    def newer(self) -> bool:
        """Written by a newer agentbus: expected, not an error."""
        return self.v > SCHEMA_VERSION

    def describe(self) -> str:
        """What it is, for people: from a newer agentbus, or an event type nobody knows (a misspelling?)."""
        if self.newer:
            return f"{self.type} from a newer agentbus (v{self.v}; this one reads v{SCHEMA_VERSION})"
        near = difflib.get_close_matches(self.type, EVENT_TYPES, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"unknown event type {self.type!r} (v{self.v}){hint}"


class InvalidEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes in the log that are not an event at all; `reason` says why, `raw` starts the payload."""

    reason: str
    raw: str = ""
    id: str = ""
    ts: float = 0.0


LogEvent = AnyEvent | UnknownEvent | InvalidEvent


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the session log as read back: the event and where it sits in the stream."""

    seq: int
    session_id: str
    channel: str  # "log", "input" or "control"
    event: LogEvent
    # The authenticated user who wrote it, from the subject's last token (input and control
    # channels; "" on the log and on messages recorded before senders were in the subject).
    sender: str = ""
