"""What both sides of the bench share: when each session was picked up and ended, seen through an
ephemeral push consumer on the log subjects (only what the stream stored counts, never a publish
it refused), and percentiles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import api

from agentbus.subjects import session_id_from_subject


def pct(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank), 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def sid_of(subject: str) -> str:
    return session_id_from_subject(subject) or subject.split(".")[2]


class Ends:
    """Completion times of sessions, from what the stream stores on every log subject."""

    def __init__(self, is_end: Callable[[bytes], bool], is_pickup: Callable[[bytes], bool]) -> None:
        self.is_end = is_end
        self.is_pickup = is_pickup
        self.ended: dict[str, float] = {}
        self.picked: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}

    async def watch(self, nc: NATS, subject: str) -> Any:
        """Watch `subject` (its stream must exist)."""

        async def on(msg: Any) -> None:
            sid = sid_of(msg.subject)
            now = time.perf_counter()
            if sid not in self.picked and self.is_pickup(msg.data):
                self.picked[sid] = now
            if self.is_end(msg.data):
                self.ended[sid] = now
                fut = self._waiters.pop(sid, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

        # A core subscription would also hear a publish the stream refuses (an end sent behind
        # an answer and kept out by its conditions, appended again later): count stored records
        # only. Ack none, new only, no flow control: the watcher sends nothing per message, so
        # the client message counts stay the sides' own.
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.NEW, mem_storage=True
        )
        return await nc.jetstream().subscribe(subject, cb=on, manual_ack=True, config=config)

    async def wait(self, sids: list[str], timeout: float = 120.0) -> None:
        loop = asyncio.get_running_loop()
        futs = []
        for sid in sids:
            if sid not in self.ended:
                fut = self._waiters.setdefault(sid, loop.create_future())
                futs.append(fut)
        if futs:
            await asyncio.wait_for(asyncio.gather(*futs), timeout)
