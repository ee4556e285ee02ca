"""Where commands a model or a submitter wrote run: bubblewrap, or (only when a pool says so) unconfined.

One `run()` is one `/bin/sh -c COMMAND` in fresh namespaces (user, pid, mount, ipc, uts,
cgroup, and network unless the policy allows it), with the session workspace as the only
writable host directory (at `/work`), `/usr` and a few `/etc` files read-only, a private
`/tmp`, a fresh `/proc`, an empty environment plus the policy's allow-list, and rlimits set
inside the new user namespace (so the process count is this call's alone). When `run()`
returns, every process of the call is gone: the sandbox's pid 1 exiting tears the pid
namespace down, and `--die-with-parent` does the same when the caller is killed.

Fork bombs: RLIMIT_NPROC is ignored for processes whose real uid is host root, and a user
namespace that maps to host uid 0 keeps that exemption. So the command never runs as host
root: an agent running as a normal user maps the sandbox to its own uid (the limit then
counts the processes of this call's user namespace, Linux >= 5.14); an agent running as
root maps the command to an unprivileged uid (`AGENTBUS_SANDBOX_UID`, 65534 by default),
writing the namespace's id map itself while bwrap waits (`--userns-block-fd`), and hands
the workspace to that uid first.

`AGENTBUS_BWRAP` names the bwrap binary (default: `bwrap` on PATH); `AGENTBUS_BWRAP=/nonexistent`
simulates a machine without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from agentbus.errors import UsageError
from agentbus.sandbox._bwrap import INSIDE, Bubblewrap
from agentbus.sandbox._process import run_process
from agentbus.sandbox._server import start_server  # a long-lived process (an MCP server), issue 17
from agentbus.sandbox._types import (
    MODES,
    RESERVED_PREFIXES,
    Limits,
    Mode,
    Outcome,
    Policy,
    Sandbox,
    SandboxUnavailable,
    base_env,
    tool_environment,
)

__all__ = [
    "INSIDE",
    "MODES",
    "RESERVED_PREFIXES",
    "Bubblewrap",
    "Limits",
    "Mode",
    "Outcome",
    "Policy",
    "Sandbox",
    "SandboxUnavailable",
    "Unconfined",
    "base_env",
    "open_sandbox",
    "start_server",
    "tool_environment",
]

log = logging.getLogger("agentbus.sandbox")


class Unconfined:
    """`sandbox = "none"`: the command runs as the agent's own user with the allow-listed environment,
    a timeout and an output cap, and nothing else. Its process group is killed at the end, but a
    process that leaves the group survives. Only for pools that say so, with a warning at start."""

    name: Mode = "none"
    confined = False

    def probe(self) -> None:
        """Always runs."""

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome:
        pgid: list[int] = []

        def kill_group() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid[0], signal.SIGKILL)

        return await run_process(
            ["/bin/sh", "-c", command],
            policy,
            env={**base_env(str(workspace)), **policy.env},
            cwd=workspace,
            spawned=lambda proc: pgid.append(proc.pid),
            exited=kill_group,
        )


def open_sandbox(mode: str, *, needed_by: str) -> Sandbox:
    """The sandbox a process asked for, probed once: `bwrap` that cannot run is refused with the reason."""
    if mode == "none":
        log.warning("%s run UNCONFINED (sandbox = \"none\"): commands see this user's files, environment "
                    "and network", needed_by)  # fmt: skip
        return Unconfined()
    if mode != "bwrap":
        raise UsageError(f"sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    sandbox = Bubblewrap()
    try:
        sandbox.probe()
    except SandboxUnavailable as err:
        raise SandboxUnavailable(
            f'{needed_by} cannot run: {err}; or set sandbox = "none" (--sandbox none) to run commands unconfined'
        ) from None
    return sandbox
