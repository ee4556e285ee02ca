"""`agentbus mcp`: agentbus as an MCP server, so Claude Code (or any MCP client) submits work to pools,
follows sessions, steers them and reads results.

`_tools.py` holds the tools (arguments, descriptions, handlers on a `Client`), `_server.py` the MCP
wiring (tools, resources, subscriptions in both protocol eras), `_http.py` who an HTTP caller is.
`servers.py` is the other direction: the MCP servers a pool's agents use as tools.
Over stdio every call acts with this process's credentials; over HTTP with the credentials its
bearer token maps to. Either way NATS enforces the caller's role.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentbus.config import Settings

# Nothing heavy at import: `agentbus.mcp.servers` (what a pools file says) is read by the supervisor,
# which never needs the SDK's server side.
__all__ = ["serve_http", "serve_stdio"]

logger = logging.getLogger("agentbus.mcp")


async def serve_stdio(settings: Settings) -> None:
    """Serve one client on standard input and output until it closes them. NATS is reached on the
    first call, so a client that starts this before the bus is up gets errors that say so, not a
    server that died."""
    from mcp.server.stdio import stdio_server

    from agentbus.mcp._connect import open_client
    from agentbus.mcp._server import AgentbusMCP, OwnCredentials

    mcp = AgentbusMCP(OwnCredentials(lambda: open_client(settings)))
    try:
        async with stdio_server() as (read, write):
            await mcp.server.run(read, write, mcp.server.create_initialization_options())
    finally:
        await mcp.aclose()


async def serve_http(settings: Settings, host: str, port: int, *, tokens_file: str | None, token_file: Path) -> None:
    """Serve Streamable HTTP at http://HOST:PORT/mcp until SIGINT/SIGTERM."""
    import uvicorn

    from agentbus.mcp._http import Tokens, auth_settings, load_tokens, own_token
    from agentbus.mcp._server import AgentbusMCP

    if tokens_file:
        callers = load_tokens(tokens_file)
        how = f"{len(callers)} callers from {tokens_file}"
    else:
        owner, _ = own_token(settings, token_file)
        callers = [owner]
        how = f"one caller with this process's credentials; its bearer token is in {token_file}"
    tokens = Tokens(callers, settings)
    mcp = AgentbusMCP(tokens)
    app = mcp.server.streamable_http_app(
        host=host, auth=auth_settings(host, port), token_verifier=tokens, streamable_http_path="/mcp"
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(f"agentbus mcp: serving http://{host}:{port}/mcp ({how})", file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        await mcp.aclose()
