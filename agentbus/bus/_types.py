"""The values the bus layer hands upward instead of raw nats-py objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's receipt for one publish."""

    stream: str
    seq: int
    duplicate: bool


class Delivery(NamedTuple):
    """One stored message as read back (a tap, or a batched direct get); a tuple, as a read makes
    thousands of them."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int
    num_pending: int
    timestamp_ns: int


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
