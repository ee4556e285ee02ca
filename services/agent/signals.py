"""How a session run stops early: control flow between the loop, its tool calls and its worker, not failures."""

from __future__ import annotations


class Released(Exception):
    """The worker is draining: stop here, leave the task for another agent."""


class Parked(Exception):
    """A tool call waits for something outside the agent (an answer, an approval, a subtask): the run
    stops, its queue message is acked, and whatever it waits for queues the session again."""


class Interrupted(Exception):
    """The model call or tool in flight was cancelled by a person's interrupt."""
