"""JSON Schemas generated from the wire types (msgspec), with what the types alone cannot say added by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from agentbus.messages import (
    SCHEMA_VERSION,
    AnyEvent,
    Hold,
    PoolSpend,
    ScaleReply,
    ScaleRequest,
    SupervisorInfo,
    Timer,
    WorkerInfo,
    WorkItem,
)
from agentbus.state import SessionState

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_TOKEN = {"pattern": "^[A-Za-z0-9_-]{1,64}$", "minLength": 1, "maxLength": 64}
_SESSION_ID = {
    "description": "a session id: 1-64 characters of A-Z a-z 0-9 _ - (agentbus makes 16: 10 characters of "
    "Crockford base32 milliseconds since the epoch, then 6 random ones, so ids sort oldest first)",
    **_TOKEN,
}


@dataclass(frozen=True)
class Family:
    """One schema file: the message kinds it covers and where they travel."""

    name: str
    title: str
    where: str
    types: tuple[Any, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.schema.json"

    @property
    def id(self) -> str:
        return f"urn:agentbus:schema:{self.name}"


FAMILIES: tuple[Family, ...] = (
    Family("events", "A session event", "agentbus.session.<session>.log, .input.<user> and .control.<user> "
           "(AGENTBUS_SESSIONS); a tagged union on `type`", (AnyEvent,)),
    Family("work", "A work item", "agentbus.work.<pool>, agentbus.submit and agentbus.evaluate: a pointer to a "
           "session and why it is queued", (WorkItem,)),
    Family("timers", "A timer", "agentbus.timer: a wake-up due later for a parked session", (Timer,)),
    Family("state", "A session's folded state", "KV bucket AGENTBUS_state, key <session>: a cache of the fold "
           "over the session's records, written only by services and admins; readers check `last_seq` against "
           "the log", (SessionState,)),
    Family("registry", "A registry entry", "KV buckets AGENTBUS_workers (key <worker id>: WorkerInfo) and "
           "AGENTBUS_supervisors (key <supervisor id>: SupervisorInfo), refreshed by heartbeats",
           (WorkerInfo, SupervisorInfo)),
    Family("spend", "A spend ledger entry", "KV bucket AGENTBUS_spend: pool.<pool> (PoolSpend) and hold.<pool> "
           "(Hold)", (PoolSpend, Hold)),
    Family("scale", "A request for workers, or its reply", "agentbus.supervisor.scale, core request/reply "
           "(not stored): ScaleRequest in, ScaleReply back", (ScaleRequest, ScaleReply)),
)  # fmt: skip

# What the types cannot say: keywords added to one field of one definition ("Type.field").
FIELD_NOTES: dict[str, dict[str, Any]] = {
    "Task.session_id": _SESSION_ID,
    "Task.prompt": {"description": "what to do; at most 1 MiB of UTF-8 (AGENTBUS_MAX_PROMPT_BYTES)"},
    "Task.pool": {"description": "the pool to run on; null or absent: a router chooses", **_TOKEN},
    "Task.submitter": {"description": "a display name; the authenticated submitter is the subject's last token"},
    "Task.parent_session": {"description": "the delegating session, for a child"},
    "Task.max_rounds": {"minimum": 1},
    "Budget.max_wall_s": {"description": "seconds since submission (CLI --max-wall; a pause names it max_wall)"},
    "WorkItem.session_id": _SESSION_ID,
    "WorkItem.reason": {"description": "why it is queued (subjects.md, Message ids)"},
    "WorkItem.round": {"description": "the evaluation round it belongs to", "minimum": 1},
    "Timer.session_id": _SESSION_ID,
    "SessionState.session_id": _SESSION_ID,
    "SessionState.last_seq": {
        "description": "the stream sequence of the last record folded (AGENTBUS_SESSIONS, "
        "shared by every session: not a per-session counter)"
    },
    "SessionState.events": {"description": "how many records were folded"},
    "HumanMessage.author": {"description": "a display name; the authenticated sender is the subject's last token"},
    "MessageDelivered.message_seq": {"description": "the stream sequence of the human message delivered"},
    "BudgetExceeded.limit": {
        "description": "the limit: max_steps, max_tool_calls, max_tokens, max_usd, max_wall (Budget.max_wall_s), "
        "no_progress, pool_ceiling_usd or fleet_ceiling_usd"
    },
    "InputRejected.source": {"description": "the subject the rejected input came on"},
}
_EVENT_ID = {
    "description": "unique within the session; the message id is <session>:<id>, so a retried append is "
    "stored once (fixed for steps that may be redone: created, routed, ended, ...)"
}


RECORDS = Family("records", "A session record as agentbus tap --json and show --json print it",
                 "one JSON object per line: where the event sits in the stream, who wrote it, and the event "
                 "as on the wire (with `author` showing the authenticated sender, `ts` filled from the "
                 "stream when the writer left it out, and an event that did not decode as type `invalid`)",
                 ())  # fmt: skip


def generate() -> dict[str, dict[str, Any]]:
    """Every family's schema, by name (and the records `tap --json` prints)."""
    out = {family.name: _schema(family) for family in FAMILIES}
    out[RECORDS.name] = _records()
    return out


def _records() -> dict[str, Any]:
    """The wrapper around an event on a reader's output; hand-written, around the events schema."""
    anything = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}
    invalid = {
        "type": "object",
        "description": "bytes that are no event this version can use (or an event of a kind its writer may not "
        "write on that channel); never folded",
        "properties": {
            "type": {"const": "invalid"},
            "reason": {"type": "string"},
            "raw": {"type": "string", "description": "the start of the payload"},
            "id": {"type": "string"},
            "ts": {"type": "number"},
        },
        "required": ["type", "reason"],
    }
    return {
        "$schema": DIALECT,
        "$id": RECORDS.id,
        "title": RECORDS.title,
        "description": RECORDS.where + ".",
        "type": "object",
        "properties": {
            "seq": {"type": "integer", "minimum": 1, "description": "the stream sequence in AGENTBUS_SESSIONS "
                    "(shared by every session: increasing within a session, not a per-session counter)"},
            "session_id": _SESSION_ID,
            "channel": {"enum": ["log", "input", "control"]},
            "sender": {"type": "string", "description": "the authenticated writer, the subject's last token "
                       "(input and control channels only)"},
            "event": {"anyOf": [{"$ref": "urn:agentbus:schema:events"}, {"$ref": "#/$defs/Invalid"},
                                {"$ref": "#/$defs/Unknown"}]},
        },
        "required": ["seq", "session_id", "channel", "event"],
        "$defs": {
            "Invalid": invalid,
            "Unknown": {**anything, "description": "an event type this version does not know, or a newer "
                        "version's event it cannot decode: shown with its fields, never folded"},
        },
    }  # fmt: skip


def dumps(schema: dict[str, Any]) -> str:
    """The text of a schema file (stable: the same code writes the same bytes)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _schema(family: Family) -> dict[str, Any]:
    roots, defs = msgspec.json.schema_components(family.types, ref_template="#/$defs/{name}")
    for name, definition in defs.items():
        _annotate(name, definition)
    head: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": family.id,
        "title": family.title,
        "description": f"{family.where}. agentbus schema version {SCHEMA_VERSION}; generated from the wire "
        "types (agentbus/messages), so code and schema never disagree.",
    }
    body = roots[0] if len(roots) == 1 else {"anyOf": list(roots)}
    return {**head, **body, "$defs": dict(sorted(defs.items()))}


def _annotate(name: str, definition: dict[str, Any]) -> None:
    props: dict[str, dict[str, Any]] = definition.get("properties", {})
    for field, notes in FIELD_NOTES.items():
        owner, _, attr = field.partition(".")
        if owner == name:
            props[attr].update(notes)
    tag = props.get("type", {}).get("enum")
    if tag is not None and "id" in props:  # a session event
        props["id"].update(_EVENT_ID)


def check_notes() -> list[str]:
    """Notes that name no field of any generated definition (a field renamed without its note)."""
    known = {
        f"{name}.{field}"
        for family in FAMILIES
        for name, definition in msgspec.json.schema_components(family.types)[1].items()
        for field in definition.get("properties", {})
    }
    return sorted(set(FIELD_NOTES) - known)
