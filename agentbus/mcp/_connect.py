"""A connected `Client` that outlives a `with` block: the MCP server holds one per caller."""

from __future__ import annotations

from agentbus.bus import Bus
from agentbus.client import Client
from agentbus.config import Settings


async def open_client(settings: Settings, *, name: str = "agentbus-mcp") -> Client:
    """Connect and check the streams as `agentbus.connect` does; the caller closes `client.bus`."""
    bus = await Bus.connect(settings, name=name)
    try:
        await bus.provision(update=False)
    except BaseException:
        await bus.close()
        raise
    return Client(bus)
