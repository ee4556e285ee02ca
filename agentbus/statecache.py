"""The state cache, checked against the log: a reader never trusts a cached entry over the log.

A session's folded state is cached in a KV bucket so readers fold only the tail. Before a cached
entry is used, its `last_seq` is compared with the session's real last sequence (one direct get
over the session's subjects): an entry that claims more than the log holds (forged, or left by
an older stream) is dropped and the state folded from the first record; one that matches is
current; one behind is brought up to date from the tail. Only services and admins write the
cache (compare-and-set, so two refreshing at once cannot move it back); everyone else folds for
themselves and leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from agentbus.errors import NoSuchSession, NotPermitted
from agentbus.state import SessionState, fold

if TYPE_CHECKING:
    from agentbus.session import SessionLog

logger = logging.getLogger("agentbus.session")
_decoder = msgspec.json.Decoder(SessionState)
_encoder = msgspec.json.Encoder()
_CONCURRENT_READS = 32  # sessions the listing folds at once when their cache entries are behind


async def listing(sessions: SessionLog, counts: dict[str, int]) -> list[SessionState]:
    """The states of many sessions (`counts`: how many records the stream holds of each), for a
    reader of every session: every cache entry in one batched read, each trusted where it folded
    exactly as many records as the stream holds for its session; any other session is read as
    `state` reads it (a few at a time). A session gone meanwhile is left out."""
    bus, ns = sessions.bus, sessions.ns
    cached: dict[str, SessionState] = {}
    prefix = f"$KV.{ns.state_bucket}."
    for d in await bus.read_direct(f"KV_{ns.state_bucket}", f"{prefix}>"):
        sid = d.subject.removeprefix(prefix)
        if not d.data or sid not in counts:  # a deleted entry, or a session gone
            continue
        try:
            entry = _decoder.decode(d.data)
        except (msgspec.MsgspecError, RecursionError):
            continue  # folded below, with the warning `state` gives
        if entry.session_id == sid and entry.events == counts[sid]:
            cached[sid] = entry
    limit = asyncio.Semaphore(_CONCURRENT_READS)

    async def one(sid: str) -> SessionState | None:
        if sid in cached:
            return cached[sid]
        async with limit:
            try:
                return await state(sessions, sid)
            except NoSuchSession:
                return None  # its only messages went away between the listing and the read

    found = await asyncio.gather(*(one(sid) for sid in counts))
    return [s for s in found if s is not None]


async def state(sessions: SessionLog, session_id: str) -> SessionState:
    """The folded state of a session, from the cache where the log bears it out."""
    bus, ns = sessions.bus, sessions.ns
    ns.session_log(session_id)  # refuses an id that is not a subject token
    last = await sessions.last_seq(session_id)
    if last == 0:
        raise NoSuchSession(session_id)
    writes = bus.identity.role in (None, "admin", "service")
    new = SessionState(session_id=session_id)
    for _ in range(5):
        cached = await bus.kv_get(ns.state_bucket, session_id)
        revision = cached[1] if cached else None
        current = _trusted(cached[0] if cached else b"", session_id, last)
        if current.last_seq == last:
            return current
        new = current
        for rec in await sessions.read(session_id, from_seq=current.last_seq + 1):
            new = fold(new, rec)
        if new.last_seq == 0:
            raise NoSuchSession(session_id)
        if not writes:
            return new
        try:
            if await bus.kv_put_if(ns.state_bucket, session_id, _encoder.encode(new), revision):
                return new
        except NotPermitted:
            return new  # a role that may not write the cache (known only now): the fold stands
        await asyncio.sleep(0)
    return new


def _trusted(raw: bytes, session_id: str, last: int) -> SessionState:
    """The cached state if the log bears it out, else an empty one to fold from the start."""
    fresh = SessionState(session_id=session_id)
    if not raw:
        return fresh
    try:
        cached = _decoder.decode(raw)
    except (msgspec.MsgspecError, RecursionError):
        logger.warning("state cache entry of %s is unreadable; folding the log instead", session_id)
        return fresh
    if cached.session_id != session_id or cached.last_seq > last:
        logger.warning(
            "state cache entry of %s claims sequence %d, the log ends at %d; folding the log instead",
            session_id, cached.last_seq, last,
        )  # fmt: skip
        return fresh
    return cached
