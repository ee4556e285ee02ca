"""Spawners: how a worker process comes to exist. Only the supervisor uses them (and holds any engine socket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from agentbus import budget
from agentbus.config import Settings
from agentbus.errors import AgentBusError
from agentbus.messages import WorkerInfo
from services.supervisor.pools import PoolSpec

log = logging.getLogger("agentbus.supervisor")


class SpawnError(AgentBusError):
    """A worker could not be started (no such image, no engine, no executable); retried with backoff."""


class WorkerHandle(Protocol):
    worker_id: str
    pool: str

    async def alive(self) -> bool: ...
    async def kill(self) -> None: ...
    async def stop(self, timeout: float = 30.0) -> None: ...
    async def reap(self) -> None:
        """After death: release what is left (a stopped container), keeping its logs."""


class Spawner(Protocol):
    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle: ...

    async def adopt(self, pools: dict[str, PoolSpec], registry: Sequence[WorkerInfo]) -> list[WorkerHandle]:
        """Workers a previous supervisor left running that this one can manage again."""


def agent_args(spec: PoolSpec, settings: Settings) -> list[str]:
    """The `agentbus agent` command line for a pool, the same for every spawner."""
    args = [
        "agent", "--pool", spec.name, "--model", spec.model, "--tools", ",".join(spec.tools),
        "--concurrency", str(spec.concurrency), "--ack-wait", str(spec.ack_wait_s),
        "--nats", settings.nats_url, "--prefix", settings.prefix,
    ]  # fmt: skip
    for model in spec.models:
        args += ["--allow-model", model]
    args += ["--sandbox", spec.sandbox, "--network" if spec.network else "--no-network"]
    for entry in spec.tool_env:
        args.append(f"--tool-env={entry}")
    for server in spec.mcp:  # a command or a URL: no secret (those come from tool_env, by name)
        args.append(f"--mcp={server.name}={server.to_json()}")
    for tool in spec.approve:
        args += ["--approve", tool]
    if spec.approval_timeout_s is not None:
        args += ["--approval-timeout", str(spec.approval_timeout_s)]
    args += ["--on-approval-timeout", spec.on_approval_timeout]
    if spec.repo:
        args += [
            "--repo",
            spec.repo,
            *(["--base", spec.base] if spec.base else []),
            "--review" if spec.review else "--no-review",
        ]
    return args + budget.to_argv(spec.budget)


def worker_creds_env(agent_creds: str, settings: Settings) -> dict[str, str]:
    """The worker's credentials, by path in its environment (never on its command line): the
    agent credentials the supervisor was given, else its own."""
    creds = agent_creds or settings.creds
    return {"AGENTBUS_CREDS": creds, "AGENTBUS_AGENT_CREDS": ""} if creds else {}


def own_creds_warning(agent_creds: str, role: str | None) -> str | None:
    """What to warn of when the workers would get the supervisor's own credentials (no
    `--agent-creds`): a service's or an admin's, which let a worker do far more than an agent's."""
    if agent_creds or role in (None, "agent"):  # given, or no agentbus roles on this server
        return None
    return (
        f"no --agent-creds: the workers get this supervisor's own credentials (role {role}), which allow "
        "far more than an agent needs; pass --agent-creds FILE (role agent: `agentbus auth add NAME --role agent`)"
    )


class ProcessHandle:
    def __init__(self, proc: subprocess.Popen[bytes], worker_id: str, pool: str) -> None:
        self.proc = proc
        self.worker_id = worker_id
        self.pool = pool

    async def alive(self) -> bool:
        return self.proc.poll() is None

    async def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        await asyncio.to_thread(self.proc.wait)

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the agent finishes its current step and hands its sessions back."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        except TimeoutError:
            await self.kill()

    async def reap(self) -> None:
        """Popen already collected the exit status; the log file stays."""


class ProcessSpawner:
    """One `agentbus agent` subprocess per worker; its output goes to `<log_dir>/<worker id>.log`."""

    def __init__(self, settings: Settings, log_dir: Path, workdir: Path, agent_creds: str = "") -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.workdir = workdir
        self.agent_creds = agent_creds

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        cmd = [sys.executable, "-m", "agentbus.cli", *agent_args(spec, self.settings), "--workdir", str(self.workdir)]
        env = {**os.environ, **spec.env, "AGENTBUS_WORKER_ID": worker_id, "PYTHONUNBUFFERED": "1"}
        env.update(worker_creds_env(self.agent_creds, self.settings))
        try:  # a full disk or an unwritable log directory is a failed start, retried with backoff
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / f"{worker_id}.log").open("ab") as out:
                # A plain Popen (not asyncio's): the handle is polled and signalled, never awaited for output.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
        except OSError as err:
            raise SpawnError(f"{worker_id}: {err}") from err
        return ProcessHandle(proc, worker_id, spec.name)

    async def adopt(self, pools: dict[str, PoolSpec], registry: Sequence[WorkerInfo]) -> list[WorkerHandle]:
        """Process workers an earlier supervisor on this host left running, found in the registry
        and confirmed by pid and environment (AGENTBUS_WORKER_ID), are managed again."""
        here = socket.gethostname()
        found: list[WorkerHandle] = []
        for info in registry:
            if info.host != here or not info.pid or not _is_worker(info.pid, info.worker_id):
                continue
            spec = pools.get(info.pool)
            # a pool not in this file may be another supervisor's: its workers are left alone
            if spec is not None and spec.spawner == "process":
                log.info("pool %s: adopted %s (pid %d)", info.pool, info.worker_id, info.pid)
                found.append(PidHandle(info.pid, info.worker_id, info.pool))
        return found


class PidHandle:
    """A process worker an earlier supervisor started, found again through the registry. It is not
    this supervisor's child, so it is watched and signalled by pid (its parent is now init)."""

    def __init__(self, pid: int, worker_id: str, pool: str) -> None:
        self.pid = pid
        self.worker_id = worker_id
        self.pool = pool

    async def alive(self) -> bool:
        return _is_worker(self.pid, self.worker_id)

    async def kill(self) -> None:
        self._signal(signal.SIGKILL)
        await self._gone(10.0)

    async def stop(self, timeout: float = 30.0) -> None:
        self._signal(signal.SIGTERM)
        if not await self._gone(timeout):
            await self.kill()

    def _signal(self, sig: signal.Signals) -> None:
        # checked right before signalling: the worker may have exited and its pid been reused
        if _is_worker(self.pid, self.worker_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def reap(self) -> None:
        """Its new parent collects the exit status; the log file stays."""

    async def _gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _is_worker(self.pid, self.worker_id):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True


def _is_worker(pid: int, worker_id: str) -> bool:
    """Whether `pid` is a live process started with AGENTBUS_WORKER_ID=`worker_id`: a pid the
    registry names may since belong to another process, or to another pid namespace."""
    proc = Path(f"/proc/{pid}")
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # exited, not yet collected by its parent
        environ = proc.joinpath("environ").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return f"AGENTBUS_WORKER_ID={worker_id}".encode() in environ


class Spawners:
    """Each pool's workers come from the spawner its `spawner` field names."""

    def __init__(self, by_kind: Mapping[str, Spawner]) -> None:
        self.by_kind = dict(by_kind)

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        return await self.by_kind[spec.spawner].spawn(spec, worker_id)

    async def adopt(self, pools: dict[str, PoolSpec], registry: Sequence[WorkerInfo]) -> list[WorkerHandle]:
        found: list[WorkerHandle] = []
        for spawner in self.by_kind.values():
            found += await spawner.adopt(pools, registry)
        return found
