"""JetStream's error codes by name, and the one place raw nats-py errors become agentbus errors."""

from __future__ import annotations

import enum

import nats.errors
import nats.js.errors


class ErrorCode(enum.IntEnum):
    """The JetStream API error codes agentbus branches on (`err_code` of an API error)."""

    INSUFFICIENT_RESOURCES = 10023  # the stream's peers are still being placed
    MAXIMUM_CONSUMERS_LIMIT = 10026  # a stream serves about a thousand consumers, then refuses
    STREAM_NAME_IN_USE = 10058  # another process created the stream just now
    WRONG_LAST_SEQUENCE = 10071  # the fence: someone else appended to the subject first
    STREAM_OFFLINE = 10118  # a clustered stream whose replicas are down
    CONSUMER_ALREADY_EXISTS = 10148  # a durable with other limits exists


# What a failover looks like from the client: a request timing out, nobody answering the
# API subject yet, or JetStream saying it is temporarily unavailable.
TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)


def code_of(err: BaseException) -> int | None:
    """The JetStream error code of an API error, or None for anything else."""
    if isinstance(err, nats.js.errors.APIError):
        return err.err_code
    return None


def description(err: BaseException) -> str:
    """One readable phrase for a nats-py error (its API description, else its type and text)."""
    if isinstance(err, nats.js.errors.APIError):
        return err.description or f"JetStream error {err.err_code}"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
