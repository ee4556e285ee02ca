"""MCP servers a pool's agents use as tools: what the pools file (`[pools.X.mcp.NAME]`) and
`agentbus agent --mcp NAME=JSON` say. Pure: the client side lives in `services/agent/mcp_tools.py`.

    [pools.coder.mcp.tracker]
    command = ["tracker-mcp", "--stdio"]     # stdio: started in the sandbox, env from the pool's tool_env
    read_only = ["/opt/tracker-mcp"]         # host paths it needs, shown to it read-only
    [pools.coder.mcp.docs]
    url = "http://127.0.0.1:9000/mcp"        # Streamable HTTP: the agent connects to it

Names are 1-40 characters of letters, digits, '-' and '_' (a tool is offered as `mcp__NAME__TOOL`,
and the Messages API allows 64 characters in a tool name).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentbus.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
KEYS = ("command", "url", "read_only")


@dataclass(frozen=True)
class McpServerSpec:
    """One MCP server: a stdio `command` (run in the sandbox) or a Streamable HTTP `url`."""

    name: str
    command: tuple[str, ...] = ()
    url: str = ""
    read_only: tuple[str, ...] = ()

    def to_json(self) -> str:
        body: dict[str, Any] = {"command": list(self.command)} if self.command else {"url": self.url}
        if self.read_only:
            body["read_only"] = list(self.read_only)
        return json.dumps(body, separators=(",", ":"))


def from_mapping(name: str, raw: Mapping[str, Any], where: str) -> McpServerSpec:
    """A server from a table (the pools file) or a JSON object (`--mcp`); UsageError naming `where`."""
    here = f"{where}, mcp server {name!r}"
    if not _NAME.fullmatch(name):
        raise UsageError(f"{here}: a name is 1-40 characters of letters, digits, '-' or '_'")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise UsageError(f"{here}: unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    command, url = raw.get("command"), raw.get("url")
    if bool(command) == bool(url):
        raise UsageError(f"{here}: give either `command` (a list: stdio) or `url` (Streamable HTTP)")
    if command is not None and not (isinstance(command, list) and all(isinstance(a, str) and a for a in command)):
        raise UsageError(f'{here}: `command` is a list of strings, e.g. ["server", "--stdio"]')
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise UsageError(f"{here}: `url` is an http:// or https:// address")
    read_only = raw.get("read_only", [])
    if not (isinstance(read_only, list) and all(isinstance(p, str) and p.startswith("/") for p in read_only)):
        raise UsageError(f"{here}: `read_only` is a list of absolute paths")
    return McpServerSpec(name=name, command=tuple(command or ()), url=str(url or ""), read_only=tuple(read_only))


def parse_option(entry: str) -> McpServerSpec:
    """`NAME=JSON`, as `agentbus agent --mcp` takes it (what the supervisor passes from the pools file)."""
    name, eq, body = entry.partition("=")
    try:
        raw = json.loads(body) if eq else None
    except ValueError as err:
        raise UsageError(f"--mcp {name}: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f'--mcp takes NAME=JSON (e.g. tracker=\'{{"command": ["tracker-mcp"]}}\'), not {entry!r}')
    return from_mapping(name, raw, "--mcp")
