"""Core request/reply, not stored: for questions whose answer is only useful now."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg

from agentbus import tracing
from agentbus.bus._core import BusCore
from agentbus.errors import BusError


class Requests(BusCore):
    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        try:
            hdrs: dict[str, str] = {}
            tracing.inject(hdrs)
            msg = await self._refusable(
                subject, lambda: self._nc.request(subject, data, timeout=timeout, headers=hdrs or None)
            )
        except nats.errors.NoRespondersError as err:
            raise BusError(f"nobody answers on {subject} (is the supervisor running?)") from err
        except (TimeoutError, nats.errors.TimeoutError) as err:
            raise BusError(f"no answer on {subject} within {timeout:g}s") from err
        return bytes(msg.data)

    async def serve(self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]) -> Callable[[], Awaitable[None]]:
        """Answer requests on `subject` (a queue group, so replicas share them); returns a stop function."""

        async def on_msg(msg: Msg) -> None:
            await msg.respond(await handler(msg.data))

        seen = len(self._link.violations)
        sub = await self._nc.subscribe(subject, queue="agentbus", cb=on_msg)
        # a refused subscription is reported before the answer to a ping sent after it; twice,
        # because nats-py may take a pong still owed for an earlier ping as the answer to the first
        await self._nc.flush()
        await self._nc.flush()
        if any(subject.lower() in v for v in self._link.violations[seen:]):
            raise self.refused(subject, f"the server refused a subscription to {subject}")
        return sub.unsubscribe
