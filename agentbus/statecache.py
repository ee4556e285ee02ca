"""The state cache, checked against the log before it is used.

A session's folded state is cached in a KV bucket so readers fold only the tail. Before a cached
entry is used for one session, its `last_seq` is compared with the session's real last sequence
(one direct get over the session's subjects): an entry that claims more than the log holds
(forged, or left by an older stream) is dropped and the state folded from the first record; one
that matches is current; one behind is brought up to date from the tail. A listing checks each
entry's record count instead (one request for all sessions, see `listing`), which a wrong entry
with the right count passes: only the writers below could make one. Only services and admins write the
cache (compare-and-set, so two refreshing at once cannot move it back); everyone else folds for
themselves and leaves it alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec

from agentbus.bus import Delivery
from agentbus.errors import BusError, NoSuchSession, NotPermitted
from agentbus.state import SessionState, fold_all

if TYPE_CHECKING:
    from agentbus.session import SessionLog

logger = logging.getLogger("agentbus.session")
_decoder = msgspec.json.Decoder(SessionState)
_encoder = msgspec.json.Encoder()
_CONCURRENT_READS = 32  # sessions the listing folds at once when their cache entries are behind


async def listing(sessions: SessionLog, counts: dict[str, int]) -> list[SessionState]:
    """The states of many sessions (`counts`: how many records the stream holds of each), for a
    reader of every session: every cache entry in one batched read, each trusted where it folded
    exactly as many records as the stream holds for its session and claims no sequence past the
    stream's last (an entry left by an older stream); any other session is read as `state` reads
    it (a few at a time). A session gone meanwhile is left out. Records are only ever added to a
    session (pruning removes whole sessions), so an equal count means the same records."""
    bus, ns = sessions.bus, sessions.ns
    cached: dict[str, SessionState] = {}
    prefix = f"$KV.{ns.state_bucket}."
    try:
        last = await bus.stream_last_seq(ns.sessions_stream)
        entries = await bus.read_direct(f"KV_{ns.state_bucket}", f"{prefix}>", _as_is)
    except BusError as err:  # the cache is a shortcut: without it, every session is folded
        logger.debug("state cache unreadable (%s); folding every session", err)
        last, entries = 0, []
    for d in entries:
        sid = d.subject.removeprefix(prefix)
        if not d.data or sid not in counts:  # a deleted entry, or a session gone
            continue
        try:
            entry = _decoder.decode(d.data)
        except (msgspec.MsgspecError, RecursionError):
            continue  # folded below, with the warning `state` gives
        if entry.session_id == sid and entry.events == counts[sid] and entry.last_seq <= last:
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
        try:
            cached = await bus.kv_get(ns.state_bucket, session_id)
        except BusError as err:  # the cache is a shortcut: without it, fold the log
            logger.debug("state cache of %s unreadable (%s); folding the log", session_id, err)
            cached, writes = None, False
        revision = cached[1] if cached else None
        current = _trusted(cached[0] if cached else b"", session_id, last)
        if current.last_seq == last:
            return current
        new = fold_all(current, await sessions.read(session_id, from_seq=current.last_seq + 1, last=last))
        if new.last_seq == 0:
            raise NoSuchSession(session_id)
        if not writes:
            return new
        try:
            if await bus.kv_put_if(ns.state_bucket, session_id, _encoder.encode(new), revision):
                return new
        except NotPermitted:
            return new  # a role that may not write the cache (known only now): the fold stands
        except BusError as err:  # its bucket unreachable (a failover taking longer): the fold stands
            logger.debug("state cache of %s not updated (%s)", session_id, err)
            return new
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


def _as_is(d: Delivery) -> Delivery:
    return d
