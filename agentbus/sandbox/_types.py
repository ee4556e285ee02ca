"""The sandbox's vocabulary: what a call may have (Policy, Limits), how it ended (Outcome), the protocol."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from agentbus.errors import UsageError

Mode = Literal["bwrap", "none"]
MODES: tuple[Mode, ...] = ("bwrap", "none")
PATH = "/usr/local/bin:/usr/bin:/bin"
# Names a tool's environment may never carry, whatever the pool says: the bus, the model key, tracing.
RESERVED_PREFIXES = ("AGENTBUS_", "ANTHROPIC_", "NATS_", "OTEL_")
_SIGNALS = {
    signal.SIGXCPU: "the CPU time limit",
    signal.SIGXFSZ: "the file size limit",
    signal.SIGKILL: "SIGKILL",
    signal.SIGSEGV: "SIGSEGV",
}


class SandboxUnavailable(UsageError):
    """The sandbox cannot run here (no bwrap, namespaces refused): commands are refused, not run bare."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per call. Memory is address space per process (RLIMIT_AS); processes count this call's alone."""

    timeout_s: float = 120.0
    cpu_s: int = 600
    memory_bytes: int = 4 << 30
    processes: int = 256
    file_bytes: int = 1 << 30
    open_files: int = 1024
    tmp_bytes: int = 512 << 20
    output_bytes: int = 64_000


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What one call may have besides the workspace: network, environment, limits, and what to do
    with output past the cap (`stop` the command, or `drain` it and keep only the first bytes)."""

    network: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    overflow: Literal["stop", "drain"] = "stop"
    # Host directories shown read-only at the same path (a long-lived MCP server's own install,
    # e.g. a virtualenv outside /usr); nothing else of the host beyond the usual system dirs.
    read_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """How a call ended. `exit_code` is None when the sandbox stopped it (timeout, output cap)."""

    exit_code: int | None
    output: bytes
    cut: bool = False
    timed_out: bool = False

    def why(self) -> str:
        """` (killed by the CPU time limit)` and the like, for an exit code that is a signal."""
        code = self.exit_code
        if code is None or code <= 128:
            return ""
        try:
            sig = signal.Signals(code - 128)
        except ValueError:
            return ""
        return f" (killed by {_SIGNALS.get(sig, sig.name)})"


class Sandbox(Protocol):
    """Runs one command against one workspace; every process it started is gone when `run` returns."""

    name: Mode
    confined: bool

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome: ...

    def probe(self) -> None:
        """Run `true` inside; raise SandboxUnavailable with the reason if it cannot run."""


def base_env(home: str) -> dict[str, str]:
    return {"PATH": PATH, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def tool_environment(entries: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-list: `NAME` takes the value the agent has (left out when unset), `NAME=VALUE` sets it.

    Names of the bus, the model key and tracing are refused even when asked for: they never reach a tool.
    """
    env: dict[str, str] = {}
    for entry in entries:
        name, eq, value = entry.partition("=")
        if not (name.isascii() and name.replace("_", "a").isalnum()) or name[0].isdigit():
            raise UsageError(f"tool_env entry {entry!r}: expected NAME or NAME=VALUE")
        if name.upper().startswith(RESERVED_PREFIXES):
            raise UsageError(f"tool_env entry {name}: {', '.join(RESERVED_PREFIXES)}* never reach a tool")
        if eq:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env
