"""What every long-running agentbus process (agent, router, evaluator, supervisor) shares."""

from __future__ import annotations

import asyncio
import signal

from agentbus.bus import Bus


class Service:
    """`run()` until `shutdown()`. A subclass implements `_serve()`, which returns once
    `_draining` is set and its work is handed back or finished."""

    def __init__(self) -> None:
        self._draining = asyncio.Event()
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            self._stopped.set()  # even when start-up failed, so shutdown() never waits forever

    async def shutdown(self) -> None:
        """Stop taking work; returns when `run()` has returned."""
        self._draining.set()
        await self._stopped.wait()

    async def _serve(self) -> None:
        raise NotImplementedError


async def serve_until_signalled(service: Service, bus: Bus) -> None:
    """A service's process: SIGINT or SIGTERM drains it; the connection closes after it stops."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(service.shutdown()))
    try:
        await service.run()
    finally:
        await bus.close()
