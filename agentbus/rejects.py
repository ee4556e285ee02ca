"""Every bad input gets a recorded answer: which records cannot be used, and the `input_rejected` that says why.

Readers already see such a record as `invalid` (or as an unknown type) with its reason; this puts the
answer where the writer and everyone watching the session look, in the session's log. Whoever reads
a channel anyway records it: the agents' `wake` and `wake-control` durables for people's channels,
the router's fan-in for `.log`. The id is fixed per stored message (`input-rejected-<seq>`), so a
redelivery records it once.
"""

from __future__ import annotations

import logging

from agentbus.errors import NoSuchSession
from agentbus.messages import InputRejected, InvalidEvent, LogEvent, UnknownEvent
from agentbus.session import SessionLog

logger = logging.getLogger("agentbus.rejects")


def why_unusable(event: LogEvent) -> str | None:
    """Why a record cannot be used, or None. A newer version's event is expected, not an error."""
    if isinstance(event, InvalidEvent):
        return event.reason
    if isinstance(event, UnknownEvent) and not event.newer:
        return event.describe()
    return None


def rejection(seq: int, subject: str, reason: str) -> InputRejected:
    """The answer to the message at `seq`; its id is fixed, so it is recorded once however often it is made."""
    return InputRejected(id=f"input-rejected-{seq}", reason=f"message #{seq}: {reason}", source=subject)


async def answer(log: SessionLog, session_id: str, seq: int, subject: str, reason: str) -> bool:
    """Record `input_rejected` for the message at `seq` in its session; False when there is no session to
    answer in (nothing but bad records: agentbus never writes into a session nobody created)."""
    try:
        state = await log.state(session_id)
    except NoSuchSession:
        return False
    if not state.created_ts:
        logger.warning("message %d on %s rejected, and no session to say so in: %s", seq, subject, reason)
        return False
    await log.append(session_id, rejection(seq, subject, reason))
    logger.info("session %s: message %d on %s rejected: %s", session_id, seq, subject, reason)
    return True
