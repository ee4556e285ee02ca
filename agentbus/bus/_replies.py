"""The answers to a connection's requests (publish acks, sync acks, batched direct gets), on one
wildcard inbox subscription, routed by the reply subject's last token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from agentbus.bus._types import Delivery, direct_delivery, stored_delivery

logger = logging.getLogger("agentbus.bus")


def unanswered(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError("no answer"))


class Collected:
    """The answers to one request that has many (a batched direct get), kept until a status message
    (end of batch, nothing found, an error) closes them: read in one pass, not awaited one by one.

    Each stored message is made a `Delivery` and converted as it arrives, in the connection's read
    loop, while the server is still sending the rest: a thousand records' work fills time a read
    otherwise spends waiting. The connection hands stored messages over before nats-py makes a
    message object of them (`Connection.take`)."""

    def __init__(self, convert: Callable[[Delivery], Any], skip_below: int = 0) -> None:
        self.convert = convert
        self.skip_below = skip_below  # messages before this sequence are counted, not kept
        self.found: list[Any] = []
        self.received = 0
        self.last_seq = 0
        self.failed: BaseException | None = None  # what converting raised: the read raises it, the loop reads on
        self.done: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    def add(self, data: bytes, headers: dict[str, str]) -> None:
        """A message as nats-py delivers it: a status closes the batch."""
        # a stored message comes with its sequence (and may carry any header of its own, "Status" too)
        if "Status" in headers and "Nats-Sequence" not in headers:
            if not self.done.done():
                self.done.set_result(headers)
        else:
            self._keep(direct_delivery, data, headers)

    def add_block(self, data: bytes, block: bytes) -> None:
        """A stored message with its header block as it came (`NATS/1.0` first)."""
        self._keep(stored_delivery, data, block)

    def _keep(self, make: Callable[[bytes, Any], Delivery], data: bytes, headers: Any) -> None:
        if self.failed is not None:
            return
        try:
            d = make(data, headers)
            self.received += 1
            if d.seq >= self.skip_below:
                self.found.append(self.convert(d))
            self.last_seq = d.seq
        except (Exception, asyncio.CancelledError) as err:  # in the read loop: raised by the read, never into nats-py
            self.failed = err

    async def until_done(self, timeout: float) -> dict[str, str]:
        """The closing status message's headers; `TimeoutError` if none came in `timeout` seconds."""
        timer = asyncio.get_running_loop().call_later(timeout, unanswered, self.done)
        try:
            return await self.done
        finally:
            timer.cancel()


class Replies:
    """The answers to this connection's JetStream requests (publish acks, direct gets), on one
    wildcard inbox subscription, routed by the reply subject's last token: a future for a single
    answer, a queue for a stream of them. nats-py's request makes a random token (a syscall), a
    timer task and a parsed ack object per publish; this is the hot path of every append."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.waiting: dict[str, asyncio.Future[Msg] | Collected] = {}
        self._n = 0

    def _token(self) -> str:
        self._n += 1
        return f"{self.base}.{self._n:x}"

    def one(self) -> tuple[str, asyncio.Future[Msg]]:
        reply = self._token()
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiting[reply] = fut
        return reply, fut

    def many(self, convert: Callable[[Delivery], Any], skip_below: int = 0) -> tuple[str, Collected]:
        reply = self._token()
        collected = Collected(convert, skip_below)
        self.waiting[reply] = collected
        return reply, collected

    def close(self, reply: str) -> None:
        self.waiting.pop(reply, None)

    # nats-py hands each message of a subscription made with `future=` to that object's
    # `set_result`, in its read loop: one hop less than a callback task per answer.
    def cancelled(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        # called in nats-py's read loop: an exception here would stop the connection reading
        try:
            waiter = self.waiting.get(msg.subject)
            if isinstance(waiter, Collected):
                waiter.add(msg.data, msg.headers or {})
            elif waiter is not None:
                del self.waiting[msg.subject]
                if not waiter.done():
                    waiter.set_result(msg)
        except Exception:
            logger.exception("an answer on %s could not be handed over", msg.subject)
