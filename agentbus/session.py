"""The session log: one durable stream, one subject pair per session.

Every event is appended with a JetStream ack and a `Nats-Msg-Id` of
`<session>:<event id>`, so re-appending after an uncertain failure never
duplicates (the one exception: the head of `append_chained`, whose id also names
the writer's attempt, so the record sent behind it follows only it). An owner may
fence its writes with the expected last sequence of the session's `log` subject;
people write to the `input` subject, which is not fenced, so steering never breaks
an agent's fence.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Literal

from agentbus import statecache
from agentbus.authority import honoured
from agentbus.bus import EXPECTED_LAST_SUBJECT_SEQ, EXPECTED_LAST_SUBJECT_SEQ_SUBJECT, Bus, Delivery, Outgoing, PubAck
from agentbus.errors import FencedError, NoSuchSession
from agentbus.messages import Event, Record, decode_event, encode
from agentbus.state import SessionState
from agentbus.subjects import parse_session_subject, session_id_from_subject, valid_token

logger = logging.getLogger("agentbus.session")

Channel = Literal["log", "input", "control"]
From = int | Literal["start", "new"]


class SessionLog:
    """Append, read, tap and fold sessions on one bus."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.ns = bus.ns

    def _subject(self, session_id: str, channel: Channel) -> str:
        if channel == "log":
            return self.ns.session_log(session_id)
        # people's channels end in the connection's own user name: the server refuses any other
        if channel == "input":
            return self.ns.session_input(session_id, self.bus.user)
        return self.ns.session_control(session_id, self.bus.user)

    # --- writing ----------------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        event: Event,
        *,
        channel: Channel = "log",
        expect_last_seq: int | None = None,
        whole_session: bool = False,
        encoded: bytes | None = None,
    ) -> PubAck:
        """Append one event; raises `FencedError` if `expect_last_seq` no longer holds: the last
        sequence of the channel's subject, or with `whole_session` of every record of the session
        (people's too). `encoded`: the event's bytes, when the caller has them already."""
        fence = self.ns.session_all(session_id) if whole_session and expect_last_seq is not None else None
        try:
            return await self.bus.publish(
                self._subject(session_id, channel),
                encode(event) if encoded is None else encoded,
                msg_id=f"{session_id}:{event.id}",
                expected_last_subject_seq=expect_last_seq,
                fence_subject=fence,
            )
        except FencedError as err:
            raise FencedError(session_id, expect_last_seq or 0) from err

    async def append_chained(
        self, session_id: str, event: Event, then: Event, *, expect_last_seq: int, people_seq: int, attempt: str
    ) -> tuple[PubAck, PubAck | TimeoutError | FencedError | None]:
        """`append(event, expect_last_seq=...)` on the log channel with `then` right behind it in
        the same round trip (`Bus.publish_chained`). `event`'s message id carries `attempt` (the
        writer's claim): `then` may follow only this attempt's own message, not one with an id
        another writer of the same step shares. `then` is also fenced on people's channels of the
        session at `people_seq` (the last people's record the writer knows): a message it has not
        seen keeps `then` out. `then`'s ack; None when it was refused, a `FencedError` when that
        fence refused it, a `TimeoutError` when no answer came (it may be stored)."""
        subject = self._subject(session_id, "log")
        people = {
            EXPECTED_LAST_SUBJECT_SEQ: str(people_seq),
            EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: self.ns.session_people(session_id),
        }
        head = Outgoing(subject, encode(event), f"{session_id}:{event.id}:{attempt}")
        tail = Outgoing(subject, encode(then), f"{session_id}:{then.id}", people)
        try:
            return await self.bus.publish_chained(head, tail, expected_last_subject_seq=expect_last_seq)
        except FencedError as err:
            raise FencedError(session_id, expect_last_seq) from err

    def outgoing(self, session_id: str, event: Event, *, channel: Channel = "log") -> Outgoing:
        """`event` as `append` would publish it, for a caller that sends it with other messages."""
        return Outgoing(self._subject(session_id, channel), encode(event), f"{session_id}:{event.id}")

    async def append_many(self, session_id: str, events: Sequence[Event], *, channel: Channel = "log") -> list[PubAck]:
        """Append several events pipelined (one round trip's latency for the lot), in order."""
        subject = self._subject(session_id, channel)
        return await self.bus.publish_many(Outgoing(subject, encode(ev), f"{session_id}:{ev.id}") for ev in events)

    async def first(self, session_id: str) -> Delivery | None:
        """The session's first record as the stream stores it (a reader of every session)."""
        found = await self.bus.read_direct(self.ns.sessions_stream, self.ns.session_all(session_id), lambda d: d, 1, 1)
        return found[0] if found else None

    async def writer(self, session_id: str) -> SessionWriter:
        """A fenced writer positioned at the current end of the session's log channel."""
        last = await self.bus.last_subject_seq(self.ns.sessions_stream, self.ns.session_log(session_id))
        return SessionWriter(self, session_id, last)

    # --- reading ----------------------------------------------------------------------------

    def tap(
        self, session_id: str | None = None, *, start: From = "start", follow: bool = True
    ) -> AsyncGenerator[Record, None]:
        """Replay a session (or every session) from `start`, then follow live: no gap, no duplicate."""
        filt = self.ns.sessions_all() if session_id is None else self.ns.session_all(session_id)
        return self.bus.replay(
            self.ns.sessions_stream,
            filt,
            record_of,
            start_seq=start if isinstance(start, int) else None,
            new_only=start == "new",
            follow=follow,
        )

    async def read(
        self,
        session_id: str,
        from_seq: int = 1,
        limit: int | None = None,
        *,
        channels: str = ">",
        last: int | None = None,
    ) -> list[Record]:
        """The session's records with stream sequence >= `from_seq` (at most `limit`).

        `channels` narrows the read: `*.*` is what people wrote (input and control), `log` what the
        owner and services wrote. A reader of every session reads with direct gets (no consumer);
        one granted single sessions, through a consumer scoped to the session, which is what its
        permissions allow. `last`: the last sequence on these channels, when the caller has just
        looked it up (a read from further on then need not look again, and ends there).
        """
        subject = f"{self.ns.session_log(session_id).removesuffix('.log')}.{channels}"
        if self.bus.identity.lists_sessions:
            return await self.bus.read_direct(
                self.ns.sessions_stream, subject, record_of, max(from_seq, 1), limit, last=last
            )
        out: list[Record] = []
        async for rec in self.tap(session_id, start=max(from_seq, 1), follow=False):
            if channels == ">" or (channels == "log") == (rec.channel == "log"):
                out.append(rec)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def exists(self, session_id: str) -> bool:
        return await self.last_seq(session_id) > 0

    async def last_seq(self, session_id: str) -> int:
        """The stream sequence of the session's last record on any channel (0: no such session);
        one direct get, which a user granted only this session may make."""
        return await self.bus.last_subject_seq(self.ns.sessions_stream, self.ns.session_all(session_id))

    async def session_ids(self) -> list[str]:
        """Every session with anything in the log, oldest id first (ids sort by creation time).

        A subject whose id token is not a valid session id (written by hand, by a foreign
        client) names no session agentbus could address: it is left out, with a warning.
        """
        return list(await self.record_counts())

    async def record_counts(self) -> dict[str, int]:
        """How many records the stream holds of each session (one request), oldest id first."""
        counts: dict[str, int] = {}
        bad: set[str] = set()
        for subj, n in (await self.bus.subject_counts(self.ns.sessions_stream, self.ns.sessions_all())).items():
            if (sid := session_id_from_subject(subj)) is None:
                continue
            if not valid_token(sid):
                bad.add(sid)
                continue
            counts[sid] = counts.get(sid, 0) + n
        if bad:
            shown = ", ".join(sorted(bad)[:5])
            logger.warning("ignoring %d subject(s) with an invalid session id: %s", len(bad), shown)
        return dict(sorted(counts.items()))

    async def states(self) -> list[SessionState]:
        """Every session's state, oldest first (`statecache.listing`); for a reader granted some
        sessions, those that exist (it learns of no others)."""
        ident = self.bus.identity
        if ident.lists_sessions:
            return await statecache.listing(self, await self.record_counts())
        states = []
        for sid in ident.sessions:
            try:
                states.append(await self.state(sid))
            except NoSuchSession:
                continue
        return states

    # --- state ------------------------------------------------------------------------------

    async def state(self, session_id: str) -> SessionState:
        """The folded state, from the KV cache plus whatever the log holds past it.

        The log is the truth; the cache only saves re-reading it, and is checked against the
        session's last sequence before it is used (`agentbus.statecache`).
        """
        return await statecache.state(self, session_id)


def record_of(d: Delivery) -> Record:
    """A stored message as a session record: the subject says which session, channel and sender."""
    sid, channel, sender = parse_session_subject(d.subject) or ("", "log", "")
    # the subject says who wrote it; an event without `ts` takes the time the stream stored it
    event = honoured(channel, sender, decode_event(d.data, d.stored_time))
    return Record(seq=d.seq, session_id=sid, channel=channel, event=event, sender=sender)


class SessionWriter:
    """Appends to one session's log channel with the fence, tracking the sequence it owns."""

    def __init__(self, log: SessionLog, session_id: str, last_seq: int) -> None:
        self.log = log
        self.session_id = session_id
        self.last_seq = last_seq

    async def append(self, event: Event, *, whole_session: bool = False) -> PubAck:
        """Append if nobody else wrote to the log channel since our last append, else `FencedError`.
        `whole_session`: nor to any channel of the session (a claim on the opening a work item
        carried, `agentbus.openings`: people's messages since then must be read first)."""
        try:
            ack = await self.log.append(self.session_id, event, expect_last_seq=self.last_seq,
                                        whole_session=whole_session)  # fmt: skip
        except FencedError:
            # nats-server checks the fence before the Nats-Msg-Id: a publish retried through a
            # failover after its first attempt was stored (the ack lost) is refused as fenced.
            # That attempt is then the first record on the log channel after our position.
            stored = await self._stored_first(event)
            if stored is None:
                raise
            ack = PubAck(self.log.ns.sessions_stream, stored, True)
        self.last_seq = max(self.last_seq, ack.seq)
        return ack

    async def append_then(
        self, event: Event, then: Event, *, people_seq: int, attempt: str
    ) -> tuple[PubAck, PubAck | None, bool]:
        """`append(event)`, with `then` sent right behind it and stored only if nothing at all came
        between them and no people's record after `people_seq` is stored
        (`SessionLog.append_chained`): one round trip for two records. Returns `event`'s ack,
        `then`'s (None when it was not stored: the caller appends it the usual way), and whether
        a people's record after `people_seq` kept it out."""
        try:
            ack, after = await self.log.append_chained(
                self.session_id, event, then, expect_last_seq=self.last_seq, people_seq=people_seq, attempt=attempt
            )
        except FencedError:  # as in `append`: a lost answer, and `event` stored by the retry
            stored = await self._stored_first(event)
            if stored is None:
                raise
            ack, after = PubAck(self.log.ns.sessions_stream, stored, True), TimeoutError("unanswered")
        self.last_seq = max(self.last_seq, ack.seq)
        if isinstance(after, FencedError):
            return ack, None, True
        if isinstance(after, TimeoutError):  # no answer (a lost connection): stored or not, the log says
            seq = await self._stored_first(then)
            after = None if seq is None else PubAck(self.log.ns.sessions_stream, seq, True)
        if after is not None:
            self.last_seq = max(self.last_seq, after.seq)
        return ack, after, False

    async def _stored_first(self, event: Event) -> int | None:
        """The sequence of `event` if it is the first log-channel record after our position. Equal
        in every field, not only in id: another agent at the same step appends the same id with
        its own content, and must stay fenced."""
        after = await self.log.read(self.session_id, from_seq=self.last_seq + 1, limit=1, channels="log")
        # as encoded, not as Structs: a tuple field given a list in memory decodes as a tuple
        return after[0].seq if after and encode(after[0].event) == encode(event) else None

    async def resync(self) -> list[Record]:
        """After a `FencedError`: the log-channel records written by others since our position."""
        records = await self.log.read(self.session_id, from_seq=self.last_seq + 1)
        foreign = [r for r in records if r.channel == "log"]
        if foreign:
            self.last_seq = max(r.seq for r in foreign)
        return foreign


__all__ = ["FencedError", "SessionLog", "SessionWriter"]
