"""agentbus: a message-bus runtime for teams of AI agents on NATS JetStream.

The client API (`connect`, `Client`, the wire types) is imported on first use, so a command
that needs none of it (`agentbus --help`) does not pay for nats-py and msgspec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agentbus.errors import (
    AgentBusError,
    FencedError,
    NatsUnreachable,
    NoSuchSession,
    SessionUnsuccessful,
    Timeout,
    UsageError,
)

if TYPE_CHECKING:
    from agentbus import messages
    from agentbus.client import Client, connect
    from agentbus.config import Settings
    from agentbus.messages import Budget, Record, Task
    from agentbus.state import SessionState

_LAZY = {
    "Budget": "agentbus.messages",
    "Client": "agentbus.client",
    "Record": "agentbus.messages",
    "SessionState": "agentbus.state",
    "Settings": "agentbus.config",
    "Task": "agentbus.messages",
    "connect": "agentbus.client",
}

__all__ = [
    "AgentBusError",
    "Budget",
    "Client",
    "FencedError",
    "NatsUnreachable",
    "NoSuchSession",
    "Record",
    "SessionState",
    "SessionUnsuccessful",
    "Settings",
    "Task",
    "Timeout",
    "UsageError",
    "connect",
    "messages",
]


def __getattr__(name: str) -> Any:
    if name == "messages":
        return importlib.import_module("agentbus.messages")
    if name not in _LAZY:
        raise AttributeError(f"module 'agentbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
