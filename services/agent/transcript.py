"""A session's records as one run knows them: what it read once, what it appended, what others wrote
since.

The run reads the whole log once, when it takes the session. After that it never reads back what it
appended (the ack gives the sequence, and it knows the event); it only looks for what others wrote:
people on their channels, and other writers on the log channel, which the owner's fence reports
(`SessionWriter.resync`). People's messages also arrive as live signals (the worker's subscription
to every session's input and command channels, `nudge`). A step boundary asks the stream (one
last-message lookup, and a read when there is something new) unless all of these hold: the
subscription was up before the run read the log and still is, it did not go down in between
(`Hearing.lost`), the connection was not lost since, no signal came for this session since
`SIGNAL_LEAD_S` before the last look (a replicated stream stores a message a little after its
subscribers heard it, so one look is not enough right after a signal), and the last look is under
`FALLBACK_S` old (a signal can also be dropped: a slow subscriber, a cluster route). Records stay in
stream order, so the conversation built from them is the same one a fresh reader of the log would
build.
"""

from __future__ import annotations

import asyncio
import bisect
import time

from agentbus.bus import PubAck
from agentbus.messages import Event, Record
from agentbus.session import SessionLog
from agentbus.state import SessionState, fold_all

# How long after a signal the stream is still asked: a replicated stream stores a message after
# its subscribers have heard it (a raft round), never seconds after.
SIGNAL_LEAD_S = 2.0
FALLBACK_S = 10.0  # the stream is asked at least this often, signal or not


class Hearing(asyncio.Event):
    """Set while the worker hears people's messages live; `lost` counts the times it stopped. A run
    that looked before a gap must look again after it, even once hearing resumed: what was said in
    between was heard by nobody."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    def clear(self) -> None:
        if self.is_set():
            self.lost += 1
        super().clear()


class Transcript:
    """The records of one session, in stream order, and their fold, kept as they grow."""

    def __init__(self, log: SessionLog, session_id: str, live: asyncio.Event | None = None) -> None:
        self.log = log
        self.sid = session_id
        self.live = live  # set while the worker hears people's messages as they are published
        self._live_at_load = False  # it was already set when the run read the log
        self._signal_at = float("-inf")  # the last signal for this session (monotonic)
        self._told = False  # the server refused a write because people wrote: look, whatever was heard
        self._looked_at = time.monotonic()  # when the stream was last asked
        self._reconnects = log.bus.reconnects
        self._lost = self._lost_now()  # how often hearing had stopped when the stream was last asked
        self.records: list[Record] = []
        self._people_to = 0  # every people's record at or below this sequence is known
        self._state = SessionState(session_id=session_id)
        self._folded = 0  # records[:_folded] are in _state
        # changes when the records change other than by growing at the end (read again, an older
        # record inserted): what others fold of them incrementally starts over (`guards.Guards`)
        self.epoch = 0

    async def load(self) -> None:
        """Everything the log holds now (one batched read for a reader of every session)."""
        self._live_at_load = self.live is not None and self.live.is_set()
        self._reconnects, self._looked_at, self._lost = self.log.bus.reconnects, time.monotonic(), self._lost_now()
        self.records = await self.log.read(self.sid)
        self._people_to = self.records[-1].seq if self.records else 0
        self._state, self._folded = SessionState(session_id=self.sid), 0
        self.epoch += 1

    def open(self, records: list[Record]) -> None:
        """What the log holds now as a work item's opening says (`agentbus.openings`), instead of a
        read: the run's claim, fenced on the whole session at the last of them, proves it. From
        here on, people's messages are looked for as after a read, except that only those up to
        the last people's record of the opening count as known: a replicated stream checks a
        fence on a wildcard against what it has stored, not against a person's message still
        being replicated, which may so land between the creation and the route."""
        self._live_at_load = self.live is not None and self.live.is_set()
        self._reconnects, self._looked_at, self._lost = self.log.bus.reconnects, time.monotonic(), self._lost_now()
        self.records = list(records)
        self._people_to = max((r.seq for r in self.records if r.channel != "log"), default=0)
        self._state, self._folded = SessionState(session_id=self.sid), 0
        self.epoch += 1

    def appended(self, ack: PubAck, event: Event) -> None:
        """What this run appended to the log channel, at the sequence the server gave it (every
        `Event` subclass this run appends is a member of the event union a `Record` holds)."""
        if ack.duplicate and any(r.seq == ack.seq for r in self.records):
            return
        self._insert(Record(seq=ack.seq, session_id=self.sid, channel="log", event=event))  # type: ignore[arg-type]

    def merge(self, records: list[Record]) -> None:
        """Records others wrote, read since (people's channels, or foreign log records after a fence)."""
        known = {r.seq for r in self.records}
        for rec in records:
            if rec.seq not in known:
                self._insert(rec)

    def people_seq(self) -> int:
        """The sequence of the last people's record this run knows on `<session>.<channel>.<user>`
        (0: none); records from before senders were in the subject (`sender` empty) are on
        `<session>.input`, which that filter does not match."""
        return max((r.seq for r in self.records if r.channel != "log" and r.sender), default=0)

    def nudge(self, at: float | None = None) -> None:
        """People wrote to this session (a live signal, heard at monotonic time `at`, else now): the
        step boundaries look in the stream until one looks `SIGNAL_LEAD_S` after it."""
        self._signal_at = max(self._signal_at, time.monotonic() if at is None else at)

    def told(self) -> None:
        """The server said people wrote what this run has not read (a fence on their channels
        refused a write): the next step boundary asks the stream, even with no signal heard."""
        self._told = True

    def must_look(self) -> bool:
        """Whether the next step boundary has to ask the stream (module docstring)."""
        if self._told:
            return True
        heard = (
            self._live_at_load
            and self.live is not None
            and self.live.is_set()
            and self.log.bus.reconnects == self._reconnects
            and self._lost_now() == self._lost
        )
        signalled = self._signal_at >= self._looked_at - SIGNAL_LEAD_S
        return not heard or signalled or time.monotonic() - self._looked_at > FALLBACK_S

    async def catch_up(self, *, force: bool = False) -> bool:
        """Read what people wrote since the last look: nothing at all when no signal says there
        is anything (module docstring), else one lookup when there is nothing new. Returns
        whether anything new arrived."""
        if not force and not self.must_look():
            return False
        told, self._told = self._told, False
        try:
            return await self._look()
        except BaseException:
            self._told = told  # not looked after all
            raise

    async def _look(self) -> bool:
        self._reconnects, self._looked_at = self.log.bus.reconnects, time.monotonic()
        # a look while nothing is heard covers only until now: once hearing resumes, look again
        self._lost = self._lost_now() if self.live is not None and self.live.is_set() else -1
        last = await self.log.bus.last_subject_seq(self.log.ns.sessions_stream, self.log.ns.session_people(self.sid))
        if last <= self._people_to:
            return False
        new = await self.log.read(self.sid, from_seq=self._people_to + 1, channels="*.*", last=last)
        # what was read, not what the lookup saw: in a cluster the read may come from a replica
        # that does not hold `last` yet, and a record skipped here would never be read again
        self._people_to = max([self._people_to, *(r.seq for r in new)])
        self.merge(new)
        return bool(new)

    def _lost_now(self) -> int:
        return self.live.lost if isinstance(self.live, Hearing) else 0

    def state(self) -> SessionState:
        """The fold of every record, brought up to date incrementally."""
        self._state = fold_all(self._state, self.records[self._folded :])
        self._folded = len(self.records)
        return self._state

    def _insert(self, rec: Record) -> None:
        at = bisect.bisect(self.records, rec.seq, key=lambda r: r.seq)
        if at < len(self.records):
            self.epoch += 1
        self.records.insert(at, rec)
        if at < self._folded:  # an older record arrived late: fold again from the start
            self._state, self._folded = SessionState(session_id=self.sid), 0
