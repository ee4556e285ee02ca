"""Spawners: how a worker process comes to exist. Only the supervisor uses them (and holds any engine socket)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from agentbus.config import Settings
from services.supervisor.pools import PoolSpec


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

    async def adopt(self, pools: dict[str, PoolSpec]) -> list[WorkerHandle]:
        """Workers a previous supervisor left running that this one can manage again."""


def agent_args(spec: PoolSpec, settings: Settings) -> list[str]:
    """The `agentbus agent` command line for a pool, the same for every spawner."""
    args = [
        "agent", "--pool", spec.name, "--model", spec.model, "--tools", ",".join(spec.tools),
        "--concurrency", str(spec.concurrency), "--ack-wait", str(spec.ack_wait_s),
        "--nats", settings.nats_url, "--prefix", settings.prefix,
    ]  # fmt: skip
    b = spec.budget
    for flag, value in (
        ("--max-steps", b.max_steps),
        ("--max-tool-calls", b.max_tool_calls),
        ("--max-tokens", b.max_tokens),
        ("--max-usd", b.max_usd),
        ("--max-wall", b.max_wall_s),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


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

    def __init__(self, settings: Settings, log_dir: Path, workdir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.workdir = workdir

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "agentbus.cli", *agent_args(spec, self.settings), "--workdir", str(self.workdir)]
        env = {**os.environ, **spec.env, "AGENTBUS_WORKER_ID": worker_id, "PYTHONUNBUFFERED": "1"}
        with (self.log_dir / f"{worker_id}.log").open("ab") as log:
            # A plain Popen (not asyncio's): the handle is polled and signalled, never awaited for output.
            proc = subprocess.Popen(  # noqa: ASYNC220
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return ProcessHandle(proc, worker_id, spec.name)

    async def adopt(self, pools: dict[str, PoolSpec]) -> list[WorkerHandle]:
        """Child processes cannot be re-parented; an orphan from a dead supervisor keeps serving
        its pool until its own stop, and its registry entry expires when it does."""
        return []


class Spawners:
    """Each pool's workers come from the spawner its `spawner` field names."""

    def __init__(self, by_kind: Mapping[str, Spawner]) -> None:
        self.by_kind = dict(by_kind)

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        return await self.by_kind[spec.spawner].spawn(spec, worker_id)

    async def adopt(self, pools: dict[str, PoolSpec]) -> list[WorkerHandle]:
        found: list[WorkerHandle] = []
        for spawner in self.by_kind.values():
            found += await spawner.adopt(pools)
        return found
