"""Test helpers shared by the agent, budget and supervisor tests: an in-process agent, gates, polling."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import WorkerInfo
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI, Responder
from services.agent.worker import AgentConfig, AgentWorker
from services.supervisor.pools import Fleet, PoolSpec
from services.supervisor.spawner import Spawner, WorkerHandle
from services.supervisor.supervisor import Supervisor

POOL = "p"
MODEL_ID = "claude-sonnet-4-6"


class Gate:
    """Holds a fake-API handler thread inside a model call until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def hold(self) -> None:
        """Called from the fake server's thread: signal arrival, then wait to be let through."""
        self.reached.set()
        self._open.wait(20)

    def open(self) -> None:
        self._open.set()

    async def wait_reached(self, timeout: float = 10.0) -> None:
        assert await asyncio.to_thread(self.reached.wait, timeout), "no model call reached the gate in time"


@asynccontextmanager
async def agent(
    settings: Settings,
    api: FakeMessagesAPI,
    workdir: Path,
    *,
    gates: tuple[Gate, ...] = (),
    max_retries: int = 2,
    **config: Any,
) -> AsyncIterator[AgentWorker]:
    """An in-process agent on its own connection; on exit the gates open, then it drains."""
    model = AnthropicModel(MODEL_ID, api_key="test", base_url=api.base_url, max_retries=max_retries)
    bus = await Bus.connect(settings, name="test-agent")
    worker = AgentWorker(bus, AgentConfig(pool=POOL, model=model.name, workdir=workdir, **config), model)
    runner = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        for gate in gates:
            gate.open()  # a held model call would otherwise keep the drain waiting
        await worker.shutdown()
        await worker.shutdown()  # idempotent
        await runner
        await model.aclose()
        await bus.close()


@asynccontextmanager
async def agent_with_fake(
    settings: Settings, workdir: Path, responder: Responder | None = None, **config: Any
) -> AsyncIterator[tuple[FakeMessagesAPI, AgentWorker]]:
    """`agent` on a fresh fake Messages API (answering with `responder` once its script runs out)."""
    with FakeMessagesAPI(responder=responder) as api:
        async with agent(settings, api, workdir, **config) as worker:
            yield api, worker


async def until(check: Callable[[], Awaitable[Any]], what: str = "a condition", timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy, failing with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def free_port() -> int:
    """A port nothing listens on right now (the caller binds it soon after)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: all sockets stay open until every port is chosen."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class IdleHandle:
    """A supervisor's worker that exists only on paper: an in-process test agent does the work."""

    def __init__(self, worker_id: str, pool: str) -> None:
        self.worker_id = worker_id
        self.pool = pool

    async def alive(self) -> bool:
        return True

    async def kill(self) -> None:
        pass

    async def stop(self, timeout: float = 30.0) -> None:
        pass

    async def reap(self) -> None:
        pass


class PaperSpawner:
    """Lets a supervisor run its loop (ceilings, registry, backlog) without starting processes."""

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        return IdleHandle(worker_id, spec.name)

    async def adopt(self, pools: dict[str, PoolSpec], registry: Sequence[WorkerInfo]) -> list[WorkerHandle]:
        return []


@asynccontextmanager
async def supervising(
    settings: Settings, fleet: Fleet, spawner: Spawner, *, bus: Bus | None = None, tick_s: float = 0.5
) -> AsyncIterator[Supervisor]:
    """A supervisor running in this process (on its own connection unless `bus` is given);
    on exit it drains its workers. It must still be running when the block ends."""
    own = bus is None
    bus = bus or await Bus.connect(settings)
    sup = Supervisor(bus, fleet, spawner, tick_s=tick_s)
    runner = asyncio.create_task(sup.run())
    try:
        yield sup
        assert not runner.done(), "the supervisor stopped on its own"
    finally:
        await sup.shutdown()
        await runner
        if own:
            await bus.close()


async def ticks_pass(sup: Supervisor, n: int = 5) -> None:
    """Let the supervisor make `n` more full passes (to see that it does *not* act)."""
    target = sup.ticks + n
    await until(lambda: _at_least(sup, target), f"{n} supervisor ticks", timeout=30)


async def _at_least(sup: Supervisor, ticks: int) -> bool:
    return sup.ticks >= ticks


async def raw_connect(settings: Settings, **options: Any) -> Any:
    """A plain nats-py connection as the settings' user (what an attacker with those credentials
    could do without agentbus); refused requests surface on `errors`, a list kept on the client."""
    import nats

    from agentbus.auth import read_creds

    creds = read_creds(settings.creds)
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    nc = await nats.connect(
        settings.nats_url,
        nkeys_seed_str=creds.seed,
        inbox_prefix=creds.identity.inbox_prefix,
        error_cb=on_error,
        allow_reconnect=False,
        **options,
    )
    nc.agentbus_errors = errors
    return nc
