"""agentbus: a message-bus runtime for teams of AI agents on NATS JetStream."""

from agentbus import messages
from agentbus.client import Client, connect
from agentbus.config import Settings
from agentbus.errors import (
    AgentBusError,
    FencedError,
    NatsUnreachable,
    NoSuchSession,
    SessionUnsuccessful,
    Timeout,
    UsageError,
)
from agentbus.messages import Budget, Record, Task
from agentbus.state import SessionState

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
