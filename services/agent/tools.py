"""Tools an agent offers the model, each confined to the session's workspace.

A tool is anything with `name`, `description`, `input_schema` and an async
`run(input, ctx) -> str`; raising `ToolError` (or any exception) becomes an
`is_error` result for the model, never a crashed loop. User packages add tools
through the `agentbus.tools` entry-point group (the entry point names a Tool
object or a zero-argument factory returning one).

Two optional attributes describe a tool to the agent (read them with `runs_commands()`
and `repeatable()`):
- `runs_commands = True`: the tool runs commands the model wrote, in `ctx.sandbox`; an agent
  offering one refuses to start where the sandbox cannot run (unless its pool says
  `sandbox = "none"`). Default False.
- `repeatable = True`: running it again after a crash cut it off is harmless (it reads, or it
  finds what its first run started). The agent loop will re-run only such calls. Default False.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from agentbus import workspace
from agentbus.errors import UsageError
from agentbus.sandbox import Limits, Outcome, Policy, Sandbox, open_sandbox

ENTRY_POINT_GROUP = "agentbus.tools"
MAX_OUTPUT = 16_000
READ_CAP = MAX_OUTPUT  # bytes of a file read_file returns at once


class ToolError(Exception):
    """A tool failed in a way the model should hear about (bad path, non-zero exit...)."""


@dataclass
class ToolContext:
    """What a running tool may use: its workspace, the sandbox for commands (with the pool's
    network and environment allow-list), and hooks into the bus the worker provides."""

    session_id: str
    workspace: Path
    step: int
    tool_use_id: str
    delegate: Callable[[str, str | None], Awaitable[str]] | None = None
    ask_human: Callable[[str], Awaitable[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sandbox: Sandbox | None = None  # set when the agent offers a tool that runs commands
    network: bool = False  # the pool's `network`: may commands reach the network?
    tool_env: Mapping[str, str] = field(default_factory=dict)  # the pool's `tool_env`, resolved
    # the diff a subtask committed on its branch: (child session or None, stat only, byte offset)
    read_child_diff: Callable[[str | None, bool, int], Awaitable[str]] | None = None

    def resolve(self, path: str) -> Path:
        """A path inside the workspace, checked lexically and by resolving symlinks at the time of the call.

        A check, not an open: a symlink swapped in afterwards is not caught. Tools that open files
        should use `agentbus.workspace` (`read_capped`, `write_file`), which never follows one.
        """
        root = self.workspace.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root):
            raise ToolError(f"path {path!r} is outside the session workspace")
        return target

    def policy(self, limits: Limits) -> Policy:
        """The sandbox policy for one command of this pool."""
        return Policy(network=self.network, env=dict(self.tool_env), limits=limits)


class Tool(Protocol):
    """A tool the model may call. An optional `repeatable = True` says a call cut off by a crash may
    simply run again (it only reads, or finds what it did); any other such call is reported to the
    model as interrupted, because running it twice could repeat a side effect."""

    name: str
    description: str
    input_schema: dict[str, Any]

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str: ...


def runs_commands(tool: Tool) -> bool:
    return bool(getattr(tool, "runs_commands", False))


def repeatable(tool: Tool) -> bool:
    return bool(getattr(tool, "repeatable", False))


def tool_sandbox(tools: Mapping[str, Tool], mode: str) -> Sandbox | None:
    """The sandbox for the tools that run commands, probed once; refused (SandboxUnavailable) where it
    cannot run unless `mode` is "none". None when no tool runs commands."""
    users = [name for name, tool in tools.items() if runs_commands(tool)]
    if not users:
        return None
    return open_sandbox(mode, needed_by=f"the {' and '.join(users)} tool{'s' if len(users) > 1 else ''}")


def _schema(props: dict[str, Any], required: Iterable[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


class ReadFile:
    name = "read_file"
    description = (
        f"Read a UTF-8 text file from the session workspace, at most {READ_CAP} bytes at a time "
        "(pass offset to read further). Symbolic links are not followed."
    )
    input_schema = _schema(
        {
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "offset": {"type": "integer", "description": "Byte to start at (default 0)."},
        },
        ["path"],
    )
    repeatable = True

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        path, offset = str(input["path"]), max(0, int(input.get("offset") or 0))
        try:
            data, size = await asyncio.to_thread(workspace.read_capped, ctx.workspace, path, READ_CAP, offset)
        except workspace.PathRefused as err:
            raise ToolError(str(err)) from None
        text = data[:READ_CAP].decode(errors="replace")
        if len(data) > READ_CAP:
            end = offset + READ_CAP
            text += f"\n... [file cut: bytes {offset}-{end} of {size} shown; read on with offset {end}]"
        return text


class WriteFile:
    name = "write_file"
    description = (
        "Write (create or replace) a UTF-8 text file in the session workspace; missing directories are made. "
        "Symbolic links are not followed."
    )
    input_schema = _schema({"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"])
    repeatable = False

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        data = str(input["content"]).encode()
        try:
            await asyncio.to_thread(workspace.write_file, ctx.workspace, str(input["path"]), data)
        except workspace.PathRefused as err:
            raise ToolError(str(err)) from None
        return f"wrote {len(data)} bytes to {input['path']}"


class Bash:
    name = "bash"
    description = (
        "Run a shell command (/bin/sh) in a sandbox: the session workspace is the current directory (/work), "
        "the system is read-only, /tmp is private, and every process ends with the command "
        "(timeout 120 s, at most 600; output capped)."
    )
    input_schema = _schema({"command": {"type": "string"}, "timeout": {"type": "number"}}, ["command"])
    runs_commands = True
    repeatable = False

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        if ctx.sandbox is None:
            raise ToolError("bash is not available: this agent has no sandbox for commands")
        timeout = min(float(input.get("timeout") or 120), 600)
        limits = Limits(timeout_s=timeout, output_bytes=MAX_OUTPUT * 4)
        outcome = await ctx.sandbox.run(str(input["command"]), ctx.workspace, ctx.policy(limits))
        return _bash_result(outcome, timeout)


def _bash_result(outcome: Outcome, timeout: float) -> str:
    text = _cap(outcome.output.decode(errors="replace"))
    if outcome.timed_out:
        raise ToolError(f"command timed out after {timeout:g}s" + (f"\n{text}" if text else ""))
    if outcome.cut:
        return text + "\n[the command was stopped: it printed more than the agent keeps]"
    if outcome.exit_code:
        raise ToolError(f"exit code {outcome.exit_code}{outcome.why()}\n{text}")
    return text or "(no output)"


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


class ReadChildDiff:
    name = "read_child_diff"
    repeatable = True  # it only reads
    description = (
        "Read the changes a subtask you delegated committed on its git branch (its repository may be "
        "another than yours): the diff from where its branch started, or with stat=true only the summary. "
        f"At most {READ_CAP} bytes at a time (pass offset to read further)."
    )
    input_schema = _schema(
        {
            "session": {"type": "string", "description": "The subtask's session id (needed if you started several)."},
            "stat": {"type": "boolean", "description": "Only the files changed and line counts."},
            "offset": {"type": "integer", "description": "Byte to start at (default 0)."},
        },
        [],
    )

    async def run(self, input: dict[str, Any], ctx: ToolContext) -> str:
        if ctx.read_child_diff is None:
            raise ToolError("read_child_diff is not available here")
        child = input.get("session")
        offset = max(0, int(input.get("offset") or 0))
        return await ctx.read_child_diff(str(child) if child else None, bool(input.get("stat")), offset)


BUILTIN: dict[str, Callable[[], Tool]] = {
    "read_file": ReadFile,
    "write_file": WriteFile,
    "bash": Bash,
    "delegate": Delegate,
    "ask_human": AskHuman,
    "read_child_diff": ReadChildDiff,
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
