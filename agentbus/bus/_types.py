"""The values the bus layer hands upward instead of raw nats-py objects."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agentbus.bus import _headers


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's receipt for one publish."""

    stream: str
    seq: int
    duplicate: bool


class Delivery:
    """One stored message as read back (a tap, or a batched direct get).

    A read makes thousands of these, and few readers look at more than the subject, payload and
    sequence: a direct get's header block and stored time (as the server spells it) are kept as
    they came and read the first time they are asked for."""

    __slots__ = ("_headers", "_time", "data", "num_pending", "seq", "subject")

    def __init__(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | bytes,
        seq: int,
        num_pending: int,
        timestamp_ns: int | str,
    ) -> None:
        self.subject, self.data, self.seq, self.num_pending = subject, data, seq, num_pending
        self._headers, self._time = headers, timestamp_ns

    @property
    def headers(self) -> Mapping[str, str]:
        """The message's headers and the server's (a block as nats-py delivers it: `NATS/1.0` first)."""
        h = self._headers
        if isinstance(h, bytes):
            h = self._headers = _headers.parse(h[_STORED_LINE:]) if len(h) > _STORED_LINE + 2 else {}
        return h

    @property
    def timestamp_ns(self) -> int:
        """When the stream stored it, in nanoseconds since the epoch (0: not known)."""
        t = self._time
        if isinstance(t, str):
            t = self._time = _timestamp_ns(t)
        return t

    def stored_time(self) -> float:
        """`timestamp_ns` in seconds."""
        return self.timestamp_ns / 1e9

    def __repr__(self) -> str:
        return f"Delivery({self.subject!r}, seq={self.seq}, {len(self.data)} bytes)"


_STORED_LINE = len(b"NATS/1.0\r\n")


def direct_delivery(data: bytes, h: Mapping[str, str]) -> Delivery:
    """A direct get's answer: the stored message, its subject, sequence and time in its headers."""
    return Delivery(
        h.get("Nats-Subject", ""),
        data,
        h,
        int(h.get("Nats-Sequence") or 0),
        int(h.get("Nats-Num-Pending") or 0),
        h.get("Nats-Time-Stamp", ""),
    )


def _server_says(block: bytes, name: bytes) -> str:
    """The value of the header line `name` (spelled `\\r\\nName:`) the server wrote last in `block`.

    A direct get's answer is the stored message's own header block with the server's lines
    appended, so the last line of a name is the server's (as the last wins in a parsed block): a
    header a publisher forged comes before it. Read without parsing the other lines."""
    at = block.rfind(name)
    if at < 0:
        return ""
    at += len(name)
    end = block.find(b"\r\n", at)
    return block[at : end if end >= 0 else len(block)].strip().decode("utf-8", "replace")


def stored_delivery(data: bytes, block: bytes) -> Delivery:
    """A direct get's answer handed over unparsed (`Connection.take`): the four values a reader
    uses read from the server's lines; the rest of the block is parsed only if asked for."""
    # nats-server appends its lines in one order: from its subject line on, every line is its
    # own. A read of a thousand records reads them so, one search instead of four.
    m = _SERVER_LINES.match(block, block.rfind(_SUBJECT))
    if m is not None:
        subject, seq, stamp, pending = m.groups()
        return Delivery(subject.decode("utf-8", "replace"), data, block, int(seq), int(pending), stamp.decode())
    seq, pending = _server_says(block, _SEQUENCE), _server_says(block, _PENDING)
    return Delivery(
        _server_says(block, _SUBJECT),
        data,
        block,
        int(seq or 0),
        int(pending or 0),
        _server_says(block, _TIME),
    )


_SUBJECT, _SEQUENCE = b"\r\nNats-Subject:", b"\r\nNats-Sequence:"
_SERVER_LINES = re.compile(
    rb"\r\nNats-Subject: ([^\r\n]*)\r\nNats-Sequence: ([0-9]+)\r\n"
    rb"Nats-Time-Stamp: ([ -~]*)\r\nNats-Num-Pending: ([0-9]+)\r\n"
)
_PENDING, _TIME = b"\r\nNats-Num-Pending:", b"\r\nNats-Time-Stamp:"


_MINUTES: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" -> seconds since the epoch: a log's records share a few


def _timestamp_ns(stamp: str) -> int:
    """`2026-11-30T07:21:47.836122756Z` to nanoseconds since the epoch (Python parses microseconds).

    A replay of a thousand records parses a thousand of these: the minute is looked up, the
    seconds and the fraction are read as digits; any other shape takes the general parser."""
    if len(stamp) >= 20 and stamp[-1] == "Z" and stamp[16] == ":" and (len(stamp) == 20 or stamp[19] == "."):
        sec, frac = stamp[17:19], stamp[20:-1]
        if sec.isascii() and sec.isdigit() and (not frac or (frac.isascii() and frac.isdigit())):
            minute = _MINUTES.get(stamp[:16])
            if minute is None:
                minute = _parse_seconds(stamp[:16])
                if minute is None:
                    return 0
                if len(_MINUTES) > 4096:
                    _MINUTES.clear()
                _MINUTES[stamp[:16]] = minute
            return (minute + int(sec)) * 1_000_000_000 + int((frac + "000000000")[:9])
    if not stamp:
        return 0
    whole, _, frac = stamp.rstrip("Z").partition(".")
    seconds = _parse_seconds(whole)
    if seconds is None:
        return 0
    try:
        return seconds * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
    except ValueError:
        return 0


def _parse_seconds(whole: str) -> int | None:
    try:
        return int(datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp())
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: where, what, and the id that deduplicates it."""

    subject: str
    data: bytes
    msg_id: str
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """Where a durable consumer stands: messages waiting for it, delivered and unacked, and the
    stream sequence of the last one it delivered."""

    name: str
    waiting: int
    in_flight: int
    delivered_seq: int


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message looked up directly (no consumer): its sequence, payload and time."""

    seq: int
    data: bytes
    time: float
