"""The conversation as a pure function of the session log.

Before every model call the agent rebuilds the Messages API `messages` from the records, so a
live agent and one resuming after a crash send byte-identical requests for the same log, which
is what makes resume exact and prompt caching hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentbus.messages import (
    ApprovalDecided,
    ApprovalRequested,
    CancelRequested,
    HumanMessage,
    InterruptRequested,
    MessageDelivered,
    ModelResponded,
    QuestionAsked,
    Record,
    ResumeRequested,
    RevisionRequested,
    SessionCreated,
    SessionEnded,
    SessionPaused,
    Task,
    ToolCallCompleted,
    ToolCallParked,
    ToolCallStarted,
    text_of,
)

CUT_OFF_NOTE = "(Your previous reply was cut off by the output token limit. Continue exactly where it stopped.)"
INTERRUPTED_NOTE = "(Your previous reply was interrupted by a person watching this session.)"


# Every kind of record the conversation is built from; any other (a claim, a status, a rejection)
# leaves it as it was.
READ_KINDS = (
    SessionCreated,
    ModelResponded,
    ToolCallStarted,
    ToolCallParked,
    ApprovalRequested,
    ApprovalDecided,
    ToolCallCompleted,
    QuestionAsked,
    HumanMessage,
    InterruptRequested,
    SessionPaused,
    ResumeRequested,
    MessageDelivered,
    RevisionRequested,
    CancelRequested,
    SessionEnded,
)


@dataclass
class ToolUse:
    """A tool call the model asked for, and what the log says about it so far."""

    step: int
    id: str
    name: str
    input: dict[str, Any]
    started: bool = False
    truncated: bool = False  # the reply was cut off by max_tokens: this call may be incomplete
    parked: bool = False  # it waits for an answer, an approval or a subtask (not cut off by a crash)
    approval_requested: bool = False
    decision: ApprovalDecided | None = None


@dataclass
class Conversation:
    """What the log implies: the messages to send next, or the work to do before that."""

    task: Task | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    last_stop: str | None = None
    pending_tools: list[ToolUse] = field(default_factory=list)
    open_question: str | None = None  # tool_use_id of an ask_human still waiting for its answer
    answer: HumanMessage | None = None  # the reply to the open question, if it has arrived
    cancel: CancelRequested | None = None
    interrupt: Record | None = None  # an interrupt with no text that has not paused the session yet
    ended: SessionEnded | None = None
    final_text: str = ""
    unanswered_humans: int = 0  # human messages (and critiques) after the model's last reply
    held: int = 0  # follow-ups (`say --queue`) waiting for the model to end its turn
    undelivered: list[Record] = field(default_factory=list)  # human messages in the request, no receipt yet
    round: int = 1

    @property
    def done(self) -> bool:
        """The model finished its turn and nobody said anything since."""
        return self.last_stop == "end_turn" and not self.pending_tools and self.unanswered_humans == 0


def human_text(msg: HumanMessage) -> str:
    return f"[message from {msg.author}] {msg.text}"


def interrupt_text(msg: InterruptRequested) -> str:
    return f"[{msg.author} interrupted you] {msg.text}"


class _Builder:
    """One pass over the records in request order."""

    def __init__(self) -> None:
        self.conv = Conversation()
        self.user: list[dict[str, Any]] = []  # user content waiting to follow the last assistant turn
        self.results: dict[str, dict[str, Any]] = {}
        self.uses: list[ToolUse] = []
        self.held: list[Record] = []  # queued follow-ups not yet released
        self.delivered: set[int] = set()
        self.included: list[Record] = []  # human messages put into the request, in order

    def add(self, rec: Record) -> None:
        # by exact type, as no event class derives from another (tests/test_messages.py holds that):
        # a resume adds a thousand records, and a chain of isinstance tests was most of the cost
        handler = _ADD.get(type(rec.event))
        if handler is not None:  # any other kind can never change a conversation (`SessionRun.conversation`)
            handler(self, rec, rec.event)

    def _created(self, rec: Record, ev: SessionCreated) -> None:
        if self.conv.task is not None:
            return  # only the first record creates the session; a later one changes nothing
        self.conv.task = ev.task
        self.user.insert(0, {"type": "text", "text": ev.task.prompt})

    def _completed(self, rec: Record, ev: ToolCallCompleted) -> None:
        self.results[ev.tool_use_id] = {
            "type": "tool_result",
            "tool_use_id": ev.tool_use_id,
            "content": ev.output,
            **({"is_error": True} if ev.is_error else {}),
        }
        if self.conv.open_question == ev.tool_use_id:
            self.conv.open_question, self.conv.answer = None, None

    def _asked(self, rec: Record, ev: QuestionAsked) -> None:
        if self.conv.open_question != ev.tool_use_id:  # a re-asked question keeps an answer already given
            self.conv.open_question, self.conv.answer = ev.tool_use_id, None

    def _interrupt(self, rec: Record, ev: InterruptRequested) -> None:
        if ev.text:
            self._say(rec, interrupt_text(ev))
        else:
            self.conv.interrupt = rec

    def _handled(self, rec: Record, ev: SessionPaused | ResumeRequested) -> None:
        self.conv.interrupt = None  # handled: the session paused for it, or someone let it go on

    def _delivered(self, rec: Record, ev: MessageDelivered) -> None:
        self.delivered.add(ev.message_seq)

    def _cancel(self, rec: Record, ev: CancelRequested) -> None:
        self.conv.cancel = self.conv.cancel or ev

    def _ended(self, rec: Record, ev: SessionEnded) -> None:
        self.conv.ended = ev

    def _model_responded(self, rec: Record, ev: ModelResponded) -> None:
        conv = self.conv
        self._flush_turn()
        _push(conv.messages, "assistant", [dict(b) for b in ev.content])
        conv.steps = max(conv.steps, ev.step)
        conv.last_stop = ev.stop_reason
        conv.unanswered_humans = 0
        if text := text_of(ev.content):
            conv.final_text = text
        self.uses = [
            # a block without an id or a name (a buggy or hostile model) is still a call, never a crash
            ToolUse(
                ev.step,
                str(b.get("id") or f"toolu_missing_{ev.step}_{i}"),
                str(b.get("name") or ""),
                dict(b.get("input") or {}) if isinstance(b.get("input"), dict) else {},
            )
            for i, b in enumerate(ev.content)
            if b.get("type") == "tool_use"
        ]
        self.results = {}
        if ev.stop_reason == "max_tokens" and self.uses:
            self.uses[-1].truncated = True
        if ev.stop_reason == "max_tokens" and not self.uses:
            self.user.append({"type": "text", "text": CUT_OFF_NOTE})
        if ev.stop_reason == "interrupted":
            self.uses = []  # a tool call in a cut reply is incomplete: never run it
            self.user.append({"type": "text", "text": INTERRUPTED_NOTE})
        if ev.stop_reason == "end_turn" and not self.uses:
            self._release_held()

    def _tool_event(
        self, rec: Record, ev: ToolCallStarted | ToolCallParked | ApprovalRequested | ApprovalDecided
    ) -> None:
        for use in self.uses:
            if use.id != ev.tool_use_id:
                continue
            if isinstance(ev, ToolCallStarted):
                use.started, use.parked = True, False
            elif isinstance(ev, ToolCallParked):
                use.parked = True
            elif isinstance(ev, ApprovalRequested):
                use.approval_requested = True
            else:
                use.decision = ev

    def _human(self, rec: Record, ev: HumanMessage) -> None:
        conv = self.conv
        conv.interrupt = None  # someone spoke after an interrupt: the session goes on with that
        if ev.mode == "queue":
            if conv.ended is not None and conv.ended.status == "completed":
                conv.ended = None  # a follow-up reopens a completed session for another turn
                conv.round += 1
            self.held.append(rec)
            if conv.last_stop == "end_turn" and not self.uses and not self.results:
                self._release_held()
            return
        if conv.open_question and conv.answer is None:
            conv.answer = ev  # the reply becomes the ask_human tool's result, not a separate turn
            self.included.append(rec)
            return
        self._say(rec, human_text(ev))

    def _say(self, rec: Record, text: str) -> None:
        self.user.append({"type": "text", "text": text})
        self.conv.unanswered_humans += 1
        self.included.append(rec)

    def _release_held(self) -> None:
        """The model ended its turn: the follow-ups queued so far become the next user turn."""
        for rec in self.held:
            assert isinstance(rec.event, HumanMessage)
            self._say(rec, human_text(rec.event))
        self.held = []

    def _revision(self, rec: Record, ev: RevisionRequested) -> None:
        conv = self.conv
        conv.round = ev.round
        conv.unanswered_humans += 1
        if ev.fresh_start and conv.task is not None:
            # Pivot: the old conversation is dropped; only the task and the critique history remain.
            conv.messages, self.uses, self.results = [], [], {}
            conv.last_stop, conv.final_text = None, ""
            self.user = [{"type": "text", "text": conv.task.prompt}]
        self.user.append({"type": "text", "text": ev.critique})

    def _flush_turn(self) -> None:
        _flush_tool_results(self.user, self.uses, self.results)
        _push(self.conv.messages, "user", self.user)
        self.user = []

    def finish(self) -> Conversation:
        conv = self.conv
        conv.pending_tools = [u for u in self.uses if u.id not in self.results]
        if not conv.pending_tools:
            _flush_tool_results(self.user, self.uses, self.results)
            _push(conv.messages, "user", self.user)
        conv.held = len(self.held)
        conv.undelivered = [r for r in self.included if r.seq not in self.delivered]
        return conv


_ADD: dict[type, Callable[[_Builder, Record, Any], None]] = {
    SessionCreated: _Builder._created,
    ModelResponded: _Builder._model_responded,
    ToolCallStarted: _Builder._tool_event,
    ToolCallParked: _Builder._tool_event,
    ApprovalRequested: _Builder._tool_event,
    ApprovalDecided: _Builder._tool_event,
    ToolCallCompleted: _Builder._completed,
    QuestionAsked: _Builder._asked,
    HumanMessage: _Builder._human,
    InterruptRequested: _Builder._interrupt,
    SessionPaused: _Builder._handled,
    ResumeRequested: _Builder._handled,
    MessageDelivered: _Builder._delivered,
    RevisionRequested: _Builder._revision,
    CancelRequested: _Builder._cancel,
    SessionEnded: _Builder._ended,
}
assert set(_ADD) == set(READ_KINDS)


def affects(rec: Record) -> bool:
    """Whether a record can change the conversation: `build` reads only these kinds."""
    return isinstance(rec.event, READ_KINDS)


def build(records: Sequence[Record]) -> Conversation:
    """Fold records (in stream order) into a `Conversation`."""
    builder = _Builder()
    for rec in in_request_order(records):
        builder.add(rec)
    return builder.finish()


_MOVABLE = frozenset({HumanMessage, InterruptRequested})  # what `in_request_order` may move


def in_request_order(records: Sequence[Record]) -> list[Record]:
    """Records in the order the model saw them, in one pass.

    A human message recorded while a model call was in flight sits before that call's
    response in the log, but the model only sees it after: move it past the response.
    """
    if not any(type(r.event) in _MOVABLE for r in records):  # most logs: nothing to move
        return list(records)
    moved: dict[int, list[Record]] = {}  # index of a response -> messages that belong after it
    out: list[Record] = []
    next_response: int | None = None
    # walk backwards so each message knows the first response after it
    for i in range(len(records) - 1, -1, -1):
        ev = records[i].event
        if isinstance(ev, ModelResponded):
            next_response = i
        elif isinstance(ev, HumanMessage | InterruptRequested) and next_response is not None:
            horizon = records[next_response].event.horizon  # type: ignore[union-attr]
            if horizon and horizon < records[i].seq:
                moved.setdefault(next_response, []).append(records[i])
    skip = {id(r) for group in moved.values() for r in group}
    for i, rec in enumerate(records):
        if id(rec) not in skip:
            out.append(rec)
        if i in moved:
            out.extend(reversed(moved[i]))  # gathered backwards: restore log order
    return out


def _flush_tool_results(user: list[dict[str, Any]], uses: list[ToolUse], results: dict[str, dict[str, Any]]) -> None:
    # The API wants every tool_result first in the user turn, in the order of the tool_use blocks.
    blocks = [results[u.id] for u in uses if u.id in results]
    user[:0] = blocks
    uses.clear()


def _push(messages: list[dict[str, Any]], role: str, content: list[dict[str, Any]]) -> None:
    if not content:
        return
    if messages and messages[-1]["role"] == role:
        # Consecutive turns of one role (pause_turn continuations, several notes) become one.
        messages[-1]["content"] = [*messages[-1]["content"], *content]
    else:
        messages.append({"role": role, "content": list(content)})
