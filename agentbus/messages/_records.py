"""What a reader gets back from the log: an event it knows, one it does not, or bytes that are no event."""

from __future__ import annotations

from typing import Any

import msgspec

from agentbus.messages._events import AnyEvent


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event of a type this version does not know (written by a newer one): kept, not dropped."""

    type: str
    id: str = ""
    ts: float = 0.0
    v: int = 0
    data: dict[str, Any] = {}


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
