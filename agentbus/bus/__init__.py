"""The bus layer: the only package that touches raw nats-py objects.

Everything above it speaks in `PubAck`, `Delivery` and `Job`. Headers are set here
and only here (`Nats-Msg-Id` for deduplication, `traceparent` for tracing, the
expected-last-subject-sequence fence), and nats-py's errors become agentbus errors
where they enter. Each concern lives in its own private module:

- `_core`: connect (fail fast, reconnect quietly), retry idempotent requests through a failover
- `_connection`, `_parser`, `_headers`: the connection itself (nats-py's client, reading quicker)
- `_provision`: streams, durable consumers and buckets of a namespace
- `_publish`: acked publishes, one at a time or pipelined
- `_read`: ordered replay into a live follow, single-message lookups
- `_queues`: durable pull consumers and the `Job`s they hand out
- `_kv`: key-value buckets
- `_requests`: core request/reply
- `_errors`: JetStream error codes by name
"""

from __future__ import annotations

from agentbus.bus._errors import ErrorCode
from agentbus.bus._kv import KeyValue
from agentbus.bus._publish import EXPECTED_LAST_SUBJECT_SEQ, EXPECTED_LAST_SUBJECT_SEQ_SUBJECT, MSG_ID, Publishing
from agentbus.bus._queues import Job, Puller, Queues, Standing
from agentbus.bus._read import Reading
from agentbus.bus._requests import Requests
from agentbus.bus._types import ConsumerState, Delivery, Outgoing, PubAck, Stored


class Bus(Publishing, Reading, Queues, KeyValue, Requests):
    """A connection to NATS with JetStream, provisioned for one namespace: `await Bus.connect(settings)`."""


__all__ = [
    "EXPECTED_LAST_SUBJECT_SEQ",
    "EXPECTED_LAST_SUBJECT_SEQ_SUBJECT",
    "MSG_ID",
    "Bus",
    "ConsumerState",
    "Delivery",
    "ErrorCode",
    "Job",
    "Outgoing",
    "PubAck",
    "Puller",
    "Standing",
    "Stored",
]
