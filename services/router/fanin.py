"""Fan-in: when every sibling of a fan-out has ended, record their results side by side in the parent.

Whoever records a sibling's end (an agent, the evaluator, a cancel, a give-up) queues a
`child_result` item for the router, as every end writer does for its parent (`WorkQueues.settled`);
the router then looks at all the siblings. Each look is complete on its own, so a crash, a
repeat or two siblings ending at once only repeat deduplicated writes; a fan-out whose last
sibling ended while no router ran is aggregated when one starts (the item waits in its queue).
"""

from __future__ import annotations

import logging

from agentbus.errors import NoSuchSession
from agentbus.messages import (
    TERMINAL,
    DelegationCompleted,
    OpinionResult,
    OpinionsAggregated,
    SessionCreated,
    SessionEnded,
    Task,
)
from agentbus.session import SessionLog
from agentbus.state import SessionState

logger = logging.getLogger("agentbus.router")


def opinion_ids(sid: str, task: Task) -> list[str]:
    """The sibling sessions of a fan-out, in the order the opinions were asked for."""
    return [f"{sid[:56]}-o{i + 1}" for i in range(len(task.opinions))]


class FanIn:
    """Collects the siblings of a fan-out into their parent."""

    def __init__(self, log: SessionLog) -> None:
        self.log = log

    async def sweep(self, states: list[SessionState]) -> None:
        """Collect every fan-out whose siblings, in this listing, have all ended while it has not."""
        by_id = {s.session_id: s for s in states}
        for s in states:
            if s.terminal or not s.children:
                continue
            siblings = {f"{s.session_id[:56]}-o{i + 1}" for i in range(len(s.children))}
            if set(s.children) != siblings or not all(c in by_id and by_id[c].terminal for c in siblings):
                continue
            first = await self.log.read(s.session_id, limit=1)
            if first and isinstance(first[0].event, SessionCreated) and first[0].event.task.opinions:
                logger.info("fan-out %s: every sibling ended and nobody said so; collecting", s.session_id)
                await self.collect(s.session_id, first[0].event.task)

    async def collect(self, parent: str, task: Task) -> None:
        """Record each ended sibling in the parent, and once all have, the aggregate and the end."""
        if (await self.log.state(parent)).terminal:
            return
        # the parent's log, not the stream's deduplication: a sibling may end long after another
        recorded = {getattr(r.event, "id", None) for r in await self.log.read(parent, channels="log")}
        states = []
        for child in opinion_ids(parent, task):
            try:
                states.append(await self.log.state(child))
            except NoSuchSession:  # not opened yet (the fan-out is still starting): not ended either
                states.append(SessionState(session_id=child))
        for s in states:
            if s.status in TERMINAL and f"delegated-{s.session_id}" not in recorded:
                done = DelegationCompleted(
                    id=f"delegated-{s.session_id}", child_session=s.session_id, status=s.status, result=s.result
                )
                await self.log.append(parent, done)
        if not all(s.status in TERMINAL for s in states):
            return
        results = tuple(
            OpinionResult(session_id=s.session_id, pool=s.pool or "", status=s.status, result=s.result, reason=s.reason)
            for s in states
        )
        await self.log.append(parent, OpinionsAggregated(id="aggregated", results=results))
        ok = [r for r in results if r.status == "completed"]
        summary = "\n\n".join(f"[{r.session_id} on {r.pool}] {r.result}" for r in ok)
        await self.log.append(
            parent,
            SessionEnded(
                id="ended",
                status="completed" if ok else "failed",
                reason=f"{len(ok)} of {len(results)} opinions completed",
                result=summary,
            ),
        )
        logger.info("fan-out %s: %d of %d opinions completed", parent, len(ok), len(results))
