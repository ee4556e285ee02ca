"""MCP servers as tools: a pool's servers' tools join the agent's tool list as `mcp__NAME__TOOL`.

Each tool is an ordinary agentbus `Tool`, so its calls go through `calls.py` like any other: recorded
before and after, counted by budgets and no-progress, held for approval when listed, and, when a
crash cut one off, re-run only if the server marks the tool read-only (`readOnlyHint`), else reported
to the model as interrupted.

A stdio server runs in the sandbox bash uses (`agentbus.sandbox.start_server`: the pool's network
and `tool_env`, its own private directory as /work, no session's workspace), one process per agent
serving every session. A server that fails to start or dies is an error result for the model and
one line in the agent's log, never a crash; the next call starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import CONNECTION_CLOSED

from agentbus.mcp.servers import McpServerSpec
from agentbus.sandbox import Limits, Policy, Sandbox, open_sandbox, start_server
from services.agent.tools import MAX_OUTPUT, Tool, ToolContext, ToolError

logger = logging.getLogger("agentbus.agent")

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 600.0
# A server lives across calls: no wall clock, and CPU time enough for days of ordinary work.
SERVER_LIMITS = Limits(timeout_s=float("inf"), cpu_s=7 * 24 * 3600)


class McpServer:
    """One MCP server of this agent, connected on first use and again after it died."""

    def __init__(self, spec: McpServerSpec, *, sandbox: Sandbox | None, workdir: Path, policy: Policy) -> None:
        self.spec = spec
        self.sandbox = sandbox
        self.workdir = workdir / ".mcp" / spec.name  # not a session id (the dot): no workspace collides
        self.policy = policy
        self._client: Client | None = None
        self._ended: asyncio.Future[str] | None = None  # resolves (with why) when the connection is gone
        self._stop = asyncio.Event()
        self._holder: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    async def list_tools(self) -> list[mcp_types.Tool]:
        client = await self._connected()
        tools: list[mcp_types.Tool] = []
        cursor: str | None = None
        while True:
            page = await client.list_tools(cursor=cursor)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                return tools

    async def call(self, tool: str, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        """The server's result; a ToolError saying what happened if it could not start or went away."""
        client = await self._connected()
        assert self._ended is not None
        ended = self._ended
        request = asyncio.ensure_future(client.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT_S))
        try:
            either: set[asyncio.Future[Any]] = {request, ended}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
        if not request.cancelled() and request.exception() is None:
            return request.result()
        err = request.exception() if not request.cancelled() else None
        if isinstance(err, MCPError) and err.code != CONNECTION_CLOSED and not ended.done():
            raise ToolError(f"MCP server {self.name}: {err}")  # the server answered with an error: it lives on
        why = ended.result() if ended.done() else _why(err) if err else "cancelled"
        await self._lost(why)
        raise ToolError(
            f"MCP server {self.name} stopped during the call ({why}); it may have partly run. "
            "It is started again on the next call."
        )

    async def aclose(self) -> None:
        await self._drop()

    # --- the connection ---------------------------------------------------------------------

    async def _connected(self) -> Client:
        async with self._lock:
            if self._client is not None and self._ended is not None and not self._ended.done():
                return self._client
            await self._drop()
            ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
            self._ended = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._holder = asyncio.create_task(self._hold(ready, self._ended), name=f"mcp-server {self.name}")
            try:
                self._client = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
            except Exception as err:
                logger.debug("MCP server %s: start failed", self.name, exc_info=True)
                why = _why(err)
                await self._drop()
                logger.warning("MCP server %s cannot start: %s", self.name, why)
                raise ToolError(
                    f"MCP server {self.name} cannot start: {why}. It is tried again on the next call."
                ) from None
            return self._client

    async def _hold(self, ready: asyncio.Future[Client], ended: asyncio.Future[str]) -> None:
        """Keep one connection open (entered and left in this task, as anyio wants) until told to stop."""
        try:
            async with Client(self._transport(ended), mode="legacy") as client:
                ready.set_result(client)
                await self._stop.wait()
        except Exception as err:
            if not ready.done():
                ready.set_exception(err)
            elif not ended.done():
                ended.set_result(_why(err))
        finally:
            if not ended.done():
                ended.set_result("closed")

    def _transport(self, ended: asyncio.Future[str]) -> Any:
        if self.spec.url:
            from mcp.client.streamable_http import streamable_http_client

            return streamable_http_client(self.spec.url)
        return self._stdio(ended)

    @asynccontextmanager
    async def _stdio(self, ended: asyncio.Future[str]) -> AsyncIterator[TransportStreams]:
        if self.sandbox is None:
            raise ToolError("no sandbox to run it in")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir.parent / f"{self.name}.stderr").open("ab")
        try:
            proc = await start_server(self.sandbox, self.spec.command, self.workdir, self.policy, stderr=log)
        finally:
            log.close()
        try:
            async with _process_streams(proc, ended, self.name) as streams:
                yield streams
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # bwrap goes, and its pid 1 with it (--die-with-parent): the whole namespace
            await proc.wait()

    async def _lost(self, why: str) -> None:
        logger.warning("MCP server %s stopped: %s; it is started again on the next call", self.name, why)
        await self._drop()

    async def _drop(self) -> None:
        self._stop.set()
        holder, self._holder, self._client = self._holder, None, None
        if holder is not None:
            try:
                await asyncio.wait_for(holder, 10)
            except (TimeoutError, asyncio.CancelledError):
                holder.cancel()
            except Exception:
                pass


@asynccontextmanager
async def _process_streams(
    proc: asyncio.subprocess.Process, ended: asyncio.Future[str], name: str
) -> AsyncIterator[TransportStreams]:
    """JSON-RPC, one message per line, over the process's stdin and stdout."""
    read_in, read_out = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_in, write_out = anyio.create_memory_object_stream[SessionMessage](0)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def reader() -> None:
        async with read_in:
            while line := await stdout.readline():
                if line.strip():
                    await read_in.send(_message(line))
        code = await proc.wait()
        if not ended.done():
            ended.set_result(f"its process exited with code {code}" if code >= 0 else f"killed by signal {-code}")

    async def writer() -> None:
        async with write_out:
            async for message in write_out:
                stdin.write(message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n")
                await stdin.drain()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_quiet, reader(), name)
        tg.start_soon(_quiet, writer(), name)
        try:
            yield read_out, write_in
        finally:
            tg.cancel_scope.cancel()
            for stream in (read_in, read_out, write_in, write_out):
                stream.close()


async def _quiet(work: Any, name: str) -> None:
    """A pipe that breaks is the server going away, which `ended` reports; nothing to raise here."""
    with contextlib.suppress(OSError, ValueError, anyio.ClosedResourceError, anyio.BrokenResourceError):
        await work


def _why(err: BaseException) -> str:
    """The innermost reason (task groups wrap the one that matters)."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _message(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as err:
        return err


@dataclass
class McpTool:
    """One tool of an MCP server, offered to the model as `mcp__SERVER__TOOL`."""

    server: McpServer
    remote: str
    name: str
    description: str
    input_schema: dict[str, Any]
    repeatable: bool = False  # the server says readOnlyHint: re-running a call a crash cut off is harmless
    runs_commands: bool = field(default=False)  # the server runs in the sandbox; the model writes no command

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        result = await self.server.call(self.remote, input)
        text = _text(result)
        if result.is_error:
            raise ToolError(text or f"{self.name} failed")
        return text or "(no output)"


def _text(result: mcp_types.CallToolResult) -> str:
    parts = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        else:
            parts.append(f"[{block.type} content not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    return (
        text if len(text) <= MAX_OUTPUT else text[:MAX_OUTPUT] + f"\n... [{len(text) - MAX_OUTPUT} more characters cut]"
    )


class McpToolset:
    """Every MCP server of the pool, and their tools once listed."""

    def __init__(
        self,
        specs: tuple[McpServerSpec, ...],
        *,
        sandbox_mode: str,
        sandbox: Sandbox | None,
        workdir: Path,
        network: bool,
        tool_env: dict[str, str],
    ) -> None:
        stdio = [s.name for s in specs if s.command]
        if stdio and sandbox is None:  # probed now, as for bash: refused at start, not mid-session
            plural = "s" if len(stdio) > 1 else ""
            sandbox = open_sandbox(sandbox_mode, needed_by=f"MCP server{plural} {', '.join(stdio)}")
        self.servers = [
            McpServer(s, sandbox=sandbox, workdir=workdir,
                      policy=Policy(network=network, env=tool_env, limits=SERVER_LIMITS, read_only=s.read_only))
            for s in specs
        ]  # fmt: skip

    async def tools(self) -> list[McpTool]:
        """The tools of every server that starts; one that does not is a line in the log, not a crash."""
        found: list[McpTool] = []
        for server in self.servers:
            try:
                listed = await server.list_tools()
            except (ToolError, Exception) as err:
                logger.warning("MCP server %s: its tools are not offered (%s)", server.name, err)
                continue
            for t in listed:
                name = f"mcp__{server.name}__{t.name}"
                if len(name) > 64 or not name.replace("-", "_").replace("_", "a").isalnum():
                    logger.warning(
                        "MCP server %s: tool %r skipped (%s is no valid tool name)", server.name, t.name, name
                    )
                    continue
                read_only = bool(t.annotations and t.annotations.read_only_hint)
                found.append(McpTool(server, t.name, name, t.description or t.title or t.name,
                                     dict(t.input_schema), repeatable=read_only))  # fmt: skip
            logger.info("MCP server %s: %d tools", server.name, len(listed))
        return found

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()


def add_tools(tools: dict[str, Tool], schemas: list[dict[str, Any]], found: list[McpTool]) -> None:
    """Put the MCP tools in the agent's tool table and the schemas it sends (in place: the run context
    holds these very objects)."""
    for tool in found:
        if tool.name in tools:
            continue
        tools[tool.name] = tool
        schemas.append({"name": tool.name, "description": tool.description, "input_schema": tool.input_schema})


__all__ = ["McpServer", "McpTool", "McpToolset", "add_tools"]
