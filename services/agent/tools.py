"""Tools an agent offers the model, each confined to the session's workspace.

A tool is anything with `name`, `description`, `input_schema` and an async
`run(input, ctx) -> str`; raising `ToolError` (or any exception) becomes an
`is_error` result for the model, never a crashed loop. User packages add tools
through the `agentbus.tools` entry-point group (the entry point names a Tool
object or a zero-argument factory returning one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from agentbus.errors import UsageError

ENTRY_POINT_GROUP = "agentbus.tools"
DEFAULT_TOOLS = ("read_file", "write_file", "delegate", "ask_human")
MAX_OUTPUT = 16_000


class ToolError(Exception):
    """A tool failed in a way the model should hear about (bad path, non-zero exit...)."""


@dataclass
class ToolContext:
    """What a running tool may use: its workspace, and hooks into the bus the worker provides."""

    session_id: str
    workspace: Path
    step: int
    tool_use_id: str
    delegate: Callable[[str, str | None], Awaitable[str]] | None = None
    ask_human: Callable[[str], Awaitable[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, path: str) -> Path:
        """A path inside the workspace; anything that escapes it (.., absolute, symlink) is refused."""
        root = self.workspace.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise ToolError(f"path {path!r} is outside the session workspace")
        return target


class Tool(Protocol):
    """A tool the model may call. An optional `repeatable = True` says a call cut off by a crash may
    simply run again (it only reads, or finds what it did); any other such call is reported to the
    model as interrupted, because running it twice could repeat a side effect."""

    name: str
    description: str
    input_schema: dict[str, Any]

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str: ...


def _schema(props: dict[str, Any], required: Iterable[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


class ReadFile:
    name = "read_file"
    description = "Read a UTF-8 text file from the session workspace."
    repeatable = True  # reading twice changes nothing: safe to run again after a crash
    input_schema = _schema({"path": {"type": "string", "description": "Path relative to the workspace."}}, ["path"])

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        target = ctx.resolve(str(input["path"]))
        if not target.is_file():
            raise ToolError(f"no such file: {input['path']}")
        return _cap(target.read_text(errors="replace"))


class WriteFile:
    name = "write_file"
    description = "Write (create or replace) a UTF-8 text file in the session workspace."
    input_schema = _schema({"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"])

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        target = ctx.resolve(str(input["path"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        content = str(input["content"])
        target.write_text(content)
        return f"wrote {len(content.encode())} bytes to {input['path']}"


class Bash:
    name = "bash"
    description = "Run a shell command in the session workspace (timeout 120 s, output capped)."
    input_schema = _schema({"command": {"type": "string"}, "timeout": {"type": "number"}}, ["command"])

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        timeout = min(float(input.get("timeout") or 120), 600)
        proc = await asyncio.create_subprocess_shell(
            str(input["command"]),
            cwd=ctx.workspace,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            env=_tool_env(ctx.workspace),
        )
        assert proc.stdout is not None
        out = bytearray()
        try:
            async with asyncio.timeout(timeout):
                # Read at most a little past the cap: `yes` must not fill the agent's memory.
                while len(out) <= MAX_OUTPUT * 4 and (chunk := await proc.stdout.read(65536)):
                    out += chunk
                capped = len(out) > MAX_OUTPUT * 4
                if capped:
                    _kill_group(proc.pid)
                await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            raise ToolError(f"command timed out after {timeout:g}s") from None
        except asyncio.CancelledError:  # an interrupt (or a drain): the command must not outlive the call
            _kill_group(proc.pid)
            await proc.wait()
            raise
        text = _cap(out.decode(errors="replace"))
        if capped:
            return text + "\n[the command was stopped: it printed more than the agent keeps]"
        if proc.returncode:
            raise ToolError(f"exit code {proc.returncode}\n{text}")
        return text or "(no output)"


def _kill_group(pid: int) -> None:
    # The whole process group: a child (`sleep`) would otherwise keep the pipe open.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def _tool_env(workspace: Path) -> dict[str, str]:
    """The environment a model-written command gets: no API keys, no agentbus or NATS settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANTHROPIC_", "AGENTBUS_", "NATS_", "OTEL_")) and not any(h in k for h in _SECRET_HINTS)
    }
    env["HOME"] = str(workspace)
    return env


class Delegate:
    name = "delegate"
    repeatable = True  # a re-run finds the child it started: one child per call
    description = "Hand a self-contained subtask to another agent (optionally of a named pool) and wait for its result."
    input_schema = _schema({"prompt": {"type": "string"}, "pool": {"type": "string"}}, ["prompt"])

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        if ctx.delegate is None:
            raise ToolError("delegation is not available here")
        pool = input.get("pool")
        return await ctx.delegate(str(input["prompt"]), str(pool) if pool else None)


class AskHuman:
    name = "ask_human"
    repeatable = True  # a re-run finds the question it asked and any answer given
    description = "Ask the people watching this session a question and wait for their reply."
    input_schema = _schema({"question": {"type": "string"}}, ["question"])

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        if ctx.ask_human is None:
            raise ToolError("no human channel here")
        return await ctx.ask_human(str(input["question"]))


BUILTIN: dict[str, Callable[[], Tool]] = {
    "read_file": ReadFile,
    "write_file": WriteFile,
    "bash": Bash,
    "delegate": Delegate,
    "ask_human": AskHuman,
}


def load_tools(names: Iterable[str]) -> dict[str, Tool]:
    """Built-ins and entry-point plug-ins by name; an unknown name is a usage error."""
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    tools: dict[str, Tool] = {}
    for name in names:
        if name in BUILTIN:
            tools[name] = BUILTIN[name]()
        elif name in plugins:
            obj = plugins[name].load()
            tools[name] = obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "run")) else obj
        else:
            known = sorted({*BUILTIN, *plugins})
            raise UsageError(f"unknown tool {name!r}; known: {', '.join(known)}")
    return tools


def schemas(tools: dict[str, Tool]) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in tools.values()]


def _cap(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return text[:MAX_OUTPUT] + f"\n... [{len(text) - MAX_OUTPUT} more characters cut]"
