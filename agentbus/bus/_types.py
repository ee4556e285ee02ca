"""The values the bus layer hands upward instead of raw nats-py objects."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PubAck:
    """JetStream's receipt for one publish."""

    stream: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stored message as read back (ordered replay)."""

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
