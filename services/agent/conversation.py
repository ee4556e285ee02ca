"""The conversation as a pure function of the session log.

An agent never keeps the conversation in memory between steps: before every
model call it rebuilds the Messages API `messages` from the records. A live
agent and one resuming after a crash therefore send byte-identical requests
for the same log, which is what makes resume exact and prompt caching hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agentbus.messages import (
    CancelRequested,
    HumanMessage,
    ModelResponded,
    QuestionAsked,
    Record,
    RevisionRequested,
    SessionCreated,
    SessionEnded,
    Task,
    ToolCallCompleted,
    ToolCallStarted,
)

CUT_OFF_NOTE = "(Your previous reply was cut off by the output token limit. Continue exactly where it stopped.)"


@dataclass
class ToolUse:
    """A tool call the model asked for, and what the log says about it so far."""

    step: int
    id: str
    name: str
    input: dict[str, Any]
    started: bool = False
    truncated: bool = False  # the reply was cut off by max_tokens: this call may be incomplete


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
    ended: SessionEnded | None = None
    final_text: str = ""
    unanswered_humans: int = 0  # human messages (and critiques) after the model's last reply
    round: int = 1

    @property
    def done(self) -> bool:
        """The model finished its turn and nobody said anything since."""
        return self.last_stop == "end_turn" and not self.pending_tools and self.unanswered_humans == 0


def human_text(msg: HumanMessage) -> str:
    return f"[message from {msg.author}] {msg.text}"


def build(records: Sequence[Record]) -> Conversation:
    """Fold records (in stream order) into a `Conversation`."""
    conv = Conversation()
    records = in_request_order(records)
    user: list[dict[str, Any]] = []  # user content waiting to follow the last assistant turn
    results: dict[str, dict[str, Any]] = {}
    uses: list[ToolUse] = []
    for rec in records:
        ev = rec.event
        if isinstance(ev, SessionCreated):
            if conv.task is not None:
                continue  # only the first record creates the session; a later one changes nothing
            conv.task = ev.task
            user.insert(0, {"type": "text", "text": ev.task.prompt})
        elif isinstance(ev, ModelResponded):
            _flush_tool_results(user, uses, results)
            _push(conv.messages, "user", user)
            user = []
            _push(conv.messages, "assistant", [dict(b) for b in ev.content])
            conv.steps = max(conv.steps, ev.step)
            conv.last_stop = ev.stop_reason
            conv.unanswered_humans = 0
            texts = [str(b.get("text", "")) for b in ev.content if b.get("type") == "text"]
            if texts:
                conv.final_text = "".join(texts).strip()
            uses = [
                ToolUse(ev.step, str(b["id"]), str(b["name"]), dict(b.get("input") or {}))
                for b in ev.content
                if b.get("type") == "tool_use"
            ]
            results = {}
            if ev.stop_reason == "max_tokens" and uses:
                uses[-1].truncated = True
            if ev.stop_reason == "max_tokens" and not uses:
                user.append({"type": "text", "text": CUT_OFF_NOTE})
        elif isinstance(ev, ToolCallStarted):
            for use in uses:
                if use.id == ev.tool_use_id:
                    use.started = True
        elif isinstance(ev, ToolCallCompleted):
            results[ev.tool_use_id] = {
                "type": "tool_result",
                "tool_use_id": ev.tool_use_id,
                "content": ev.output,
                **({"is_error": True} if ev.is_error else {}),
            }
            if conv.open_question == ev.tool_use_id:
                conv.open_question, conv.answer = None, None
        elif isinstance(ev, QuestionAsked):
            if conv.open_question != ev.tool_use_id:  # a re-asked question keeps an answer already given
                conv.open_question, conv.answer = ev.tool_use_id, None
        elif isinstance(ev, HumanMessage):
            if conv.open_question and conv.answer is None:
                conv.answer = ev  # the reply becomes the ask_human tool's result, not a separate turn
            else:
                user.append({"type": "text", "text": human_text(ev)})
                conv.unanswered_humans += 1
        elif isinstance(ev, RevisionRequested):
            conv.round = ev.round
            conv.unanswered_humans += 1
            if ev.fresh_start and conv.task is not None:
                # Pivot: the old conversation is dropped; only the task and the critique history remain.
                conv.messages, uses, results = [], [], {}
                conv.last_stop, conv.final_text = None, ""
                user = [{"type": "text", "text": conv.task.prompt}]
            user.append({"type": "text", "text": ev.critique})
        elif isinstance(ev, CancelRequested):
            conv.cancel = conv.cancel or ev
        elif isinstance(ev, SessionEnded):
            conv.ended = ev
    conv.pending_tools = [u for u in uses if u.id not in results]
    if not conv.pending_tools:
        _flush_tool_results(user, uses, results)
        _push(conv.messages, "user", user)
    return conv


def in_request_order(records: Sequence[Record]) -> list[Record]:
    """Records in the order the model saw them.

    A human message recorded while a model call was in flight sits before that call's
    response in the log, but the model only sees it after: move it past the response.
    """
    keyed = []
    for i, rec in enumerate(records):
        key = (i, 0, i)
        if isinstance(rec.event, HumanMessage):
            for j in range(i + 1, len(records)):
                nxt = records[j].event
                if isinstance(nxt, ModelResponded):
                    if nxt.horizon and nxt.horizon < rec.seq:
                        key = (j, 1, i)
                    break
        keyed.append((key, rec))
    return [rec for _, rec in sorted(keyed, key=lambda kr: kr[0])]


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
