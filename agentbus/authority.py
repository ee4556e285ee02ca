"""What a session event counts as, given where it was written: the subject names the writer and the channel.

Pure. The log channel is written by services and agents, and carries anything. People write on
their own `input.<user>` (steering: human messages, cancel and interrupt requests, approval
decisions, inbox dismissals) and `control.<user>`
(commands: the submitted task, routing to a named pool, resume requests, a branch merged) subjects, and the
server lets each user publish only under their own name. An event of another kind on a people's
channel (a forged `session_ended`, a `resume_requested` from someone who may only steer) is read
back as an `InvalidEvent` that says so, never folded. The author a person claims (`say --as`)
stays a display name beside the authenticated sender.
"""

from __future__ import annotations

import msgspec

from agentbus.messages import (
    ApprovalDecided,
    BranchMerged,
    CancelRequested,
    HumanMessage,
    InboxDismissed,
    InterruptRequested,
    InvalidEvent,
    LogEvent,
    ResumeRequested,
    Routed,
    SessionCreated,
    UnknownEvent,
    event_type,
)

INPUT_KINDS: tuple[type, ...] = (HumanMessage, CancelRequested, InterruptRequested, ApprovalDecided, InboxDismissed)
CONTROL_KINDS: tuple[type, ...] = (SessionCreated, Routed, ResumeRequested, CancelRequested, BranchMerged)
# before senders were part of the subject, `<session>.input` carried every person's event
LEGACY_INPUT_KINDS: tuple[type, ...] = (HumanMessage, CancelRequested, ResumeRequested)


def display(sender: str, claimed: str) -> str:
    """The author as shown: the authenticated sender, and a different claimed name only as such."""
    if not claimed or claimed == sender:
        return sender
    return f'{sender} (as "{claimed}")'


def honoured(channel: str, sender: str, event: LogEvent) -> LogEvent:
    """The event as it counts, for a record read from `channel` written by `sender`."""
    if channel == "log" or isinstance(event, UnknownEvent | InvalidEvent):
        return event
    kinds = CONTROL_KINDS if channel == "control" else INPUT_KINDS if sender else LEGACY_INPUT_KINDS
    if not isinstance(event, kinds):
        writer = sender or "someone"
        return InvalidEvent(
            reason=f"{event_type(event)} written by {writer} on the {channel} channel, where people may not write it;"
            " not honoured",
            id=event.id,
            ts=event.ts,
        )
    if not sender:
        return event
    if isinstance(
        event,
        HumanMessage
        | CancelRequested
        | ResumeRequested
        | InterruptRequested
        | ApprovalDecided
        | InboxDismissed
        | BranchMerged,
    ):
        return msgspec.structs.replace(event, author=display(sender, event.author))
    if isinstance(event, SessionCreated):
        task = msgspec.structs.replace(event.task, submitter=display(sender, event.task.submitter))
        return msgspec.structs.replace(event, task=task)
    return event
