"""The answers to a connection's requests (publish acks, sync acks, batched direct gets), on one
wildcard inbox subscription, routed by the reply subject's last token."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.msg import Msg

logger = logging.getLogger("agentbus.bus")


def unanswered(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError("no answer"))


class Collected:
    """The answers to one request that has many (a batched direct get), kept until a status message
    (end of batch, nothing found, an error) closes them: read in one pass, not awaited one by one."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self.done: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    def add(self, msg: Msg) -> None:
        headers = msg.headers or {}
        # a stored message comes with its sequence (and may carry any header of its own, "Status" too)
        if "Status" in headers and "Nats-Sequence" not in headers:
            if not self.done.done():
                self.done.set_result(msg)
        else:
            self.msgs.append(msg)

    async def until_done(self, timeout: float) -> Msg:
        """The closing status message; `TimeoutError` if none came in `timeout` seconds."""
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

    def many(self) -> tuple[str, Collected]:
        reply = self._token()
        collected = Collected()
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
                waiter.add(msg)
            elif waiter is not None:
                del self.waiting[msg.subject]
                if not waiter.done():
                    waiter.set_result(msg)
        except Exception:
            logger.exception("an answer on %s could not be handed over", msg.subject)
