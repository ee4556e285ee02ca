"""A long-lived process in the sandbox (an MCP server an agent talks to over its stdin and stdout).

`run()` is one command to its end with the output captured; a server instead lives across many
tool calls and speaks on its pipes. The confinement is the same as `run()`'s (namespaces, ids,
rlimits, the environment allow-list, `--die-with-parent`, so it dies with its agent, `kill -9`
included); what differs is that stdin and stdout are pipes the caller keeps, stderr goes where the
caller says, and nothing waits for it to end: the caller kills it (the pid namespace goes with
bwrap's pid 1). Its "workspace" is a directory of its own, not a session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from agentbus.sandbox._bwrap import INSIDE_UID, Bubblewrap, _prlimit
from agentbus.sandbox._process import Fds
from agentbus.sandbox._types import Policy, Sandbox, SandboxUnavailable, base_env
from agentbus.workspace import hand_over

LINE_LIMIT = 32 << 20  # one JSON-RPC message per line; a tool's result can be large


async def start_server(
    sandbox: Sandbox, argv: Sequence[str], workdir: Path, policy: Policy, *, stderr: int | IO[bytes]
) -> asyncio.subprocess.Process:
    """Start `argv` confined as `sandbox` says, with `workdir` as its /work and current directory."""
    if isinstance(sandbox, Bubblewrap):
        return await _bwrap(sandbox, argv, workdir, policy, stderr)
    return await asyncio.create_subprocess_exec(  # sandbox = "none": the pool said so, and was warned
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        env={**base_env(str(workdir)), **policy.env}, cwd=workdir, start_new_session=True, limit=LINE_LIMIT,
    )  # fmt: skip


async def _bwrap(
    sb: Bubblewrap, argv: Sequence[str], workdir: Path, policy: Policy, stderr: int | IO[bytes]
) -> asyncio.subprocess.Process:
    if sb.as_root:
        await asyncio.to_thread(hand_over, workdir, sb.host_uid, sb.host_gid)
    with Fds() as fds:
        ws = fds.keep(os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        options = sb._options(policy, fds, ws)
        info_r, info_w = fds.pipe()
        options += ["--info-fd", str(fds.pass_(info_w))]
        block_w = None
        if sb.as_root:
            block_r, block_w = fds.pipe()
            options += ["--userns-block-fd", str(fds.pass_(block_r))]
        else:
            options += ["--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID)]
        args = fds.pass_(fds.data("args", b"".join(o.encode() + b"\0" for o in options)))
        inner = [*sb._drop(), *_prlimit(policy.limits), "--", *argv]
        proc = await asyncio.create_subprocess_exec(
            sb.bwrap, "--args", str(args), "--", *inner, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, env={}, pass_fds=tuple(fds.passed),
            start_new_session=True, limit=LINE_LIMIT,
        )  # fmt: skip
        fds.close_passed()
        # as root: map the ids, then let bwrap go on. A bwrap that failed before making the namespace
        # exits on its own, and the caller reads the end of its stdout.
        with contextlib.suppress(SandboxUnavailable):
            await sb._started(info_r, block_w, fds)
    return proc
