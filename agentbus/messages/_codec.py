"""Encoding and decoding: bytes from the bus become values, never exceptions, wherever they came from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import msgspec

from agentbus.messages._events import EVENT_TYPES, AnyEvent
from agentbus.messages._payloads import WorkItem
from agentbus.messages._records import InvalidEvent, LogEvent, Record, UnknownEvent
from agentbus.messages._wire import MISSING_TS, MISSING_VERSION, READING, SCHEMA_VERSION, TS_MAX, TS_MIN

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_work_decoder = msgspec.json.Decoder(WorkItem)


# A work item whose opening does not decode is still a work item: the opening only saves a read
# (`agentbus.openings`), and a newer router's, or another language's, must not cost the task.
def _field(f: msgspec.structs.FieldInfo) -> tuple[str, Any, Any]:
    if f.name == "opening":
        return (f.name, Any, None)  # anything: it is dropped
    if f.default_factory is not msgspec.NODEFAULT:
        return (f.name, f.type, msgspec.field(default_factory=f.default_factory))
    return (f.name, f.type, f.default)


_WorkWithoutOpening = msgspec.defstruct(
    "WorkWithoutOpening", [_field(f) for f in msgspec.structs.fields(WorkItem)], kw_only=True
)
_work_without_opening = msgspec.json.Decoder(_WorkWithoutOpening)


class _SessionId(msgspec.Struct):
    session_id: Any = None


_session_id_decoder = msgspec.json.Decoder(_SessionId)


class _Kind(msgspec.Struct):
    type: Any = None


_kind_decoder = msgspec.json.Decoder(_Kind)


def kind_of(data: bytes) -> str | None:
    """The `type` a payload names, without decoding the rest of it (None: not a JSON object with
    a string `type`). It says nothing of whether the rest is a valid event of that type."""
    try:
        kind = _kind_decoder.decode(data).type
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    return kind if isinstance(kind, str) else None


def encode(obj: msgspec.Struct) -> bytes:
    if isinstance(obj, UnknownEvent):
        return _encoder.encode({**obj.data, "type": obj.type, "id": obj.id, "ts": obj.ts, "v": obj.v})
    return _encoder.encode(obj)


def _when(stored_ts: float | Callable[[], float] | None) -> float:
    return (stored_ts() if callable(stored_ts) else stored_ts) or 0.0


def decode_event(data: bytes, stored_ts: float | Callable[[], float] | None = None) -> LogEvent:
    """Decode one log payload; never raises: unknown types and garbage come back as values.

    A known type decodes to its event (fields a newer version added are ignored); a type this
    version does not know, or a known one from a newer version that does not decode here, is an
    `UnknownEvent` carrying its fields; anything else is an `InvalidEvent` saying why, a `ts` that
    is not plausible seconds since the epoch included. An event without `ts` gets `stored_ts`, the
    time the stream stored it (0.0 when the caller does not know it), or what a function of no
    arguments (which must not raise) gives, asked only for an event without `ts` or a payload that
    is not a known event: nearly every event has its `ts`, and reading the stored time costs a
    reader of a long log more than the decode.
    """
    token = READING.set(True)
    try:
        event: LogEvent = _event_decoder.decode(data)
    except msgspec.ValidationError as err:
        known_err = err
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        return InvalidEvent(reason=f"not JSON: {err}", raw=_preview(data), ts=_when(stored_ts))
    else:
        if event.ts == MISSING_TS:
            event = msgspec.structs.replace(event, ts=_when(stored_ts))
        return event
    finally:
        READING.reset(token)
    when = _when(stored_ts)
    try:
        obj = _dict_decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as err:
        return InvalidEvent(reason=f"not a JSON object: {err}", raw=_preview(data), ts=when)
    kind, version, ts = obj.get("type"), obj.get("v", MISSING_VERSION), obj.get("ts", when)
    newer = _is_int(version) and version > SCHEMA_VERSION
    ident = str(obj.get("id", ""))
    if "ts" in obj and not (_is_number(ts) and TS_MIN <= ts < TS_MAX):
        reason = (
            f"invalid event: ts {ts!r} is not seconds since the epoch (a float; milliseconds are 1000 times too big)"
        )
        return InvalidEvent(reason=reason, raw=_preview(data), id=ident, ts=when)
    if isinstance(kind, str) and (kind not in EVENT_TYPES or newer):
        return UnknownEvent(
            type=kind,
            id=ident,
            ts=float(ts),
            v=version if _is_int(version) else MISSING_VERSION,
            data={k: v for k, v in obj.items() if k not in ("type", "id", "ts", "v")},
        )
    return InvalidEvent(reason=f"invalid event: {known_err}", raw=_preview(data), id=ident, ts=when)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def session_id_of(data: bytes) -> str | None:
    """The session id a payload names, even if the rest of it is malformed (to record why it was dropped).

    None unless it is a JSON object whose `session_id` is a valid subject token.
    """
    try:  # only the id: a work item may carry a whole task in its opening
        sid = _session_id_decoder.decode(data).session_id
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(sid, str) and 0 < len(sid) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in sid):
        return sid
    return None


def decode_work(data: bytes) -> WorkItem:
    """A queue message's work item; raises `msgspec.MsgspecError` for anything else (deep nesting included)."""
    token = READING.set(True)
    try:
        try:
            return _work_decoder.decode(data)
        except msgspec.ValidationError as err:
            if "`$.opening" not in str(err):
                raise
            plain = _work_without_opening.decode(data)
        return WorkItem(**{f: getattr(plain, f) for f in plain.__struct_fields__ if f != "opening"})
    except RecursionError as err:  # msgspec's answer to ~1,000 levels of nesting
        raise msgspec.DecodeError(f"nested too deeply: {err}") from err
    except UnicodeDecodeError as err:
        raise msgspec.DecodeError(f"not UTF-8: {err}") from err
    finally:
        READING.reset(token)


def ended_id(turn: int) -> str:
    """The id of a session's `session_ended` event in `turn` (a follow-up reopens a completed
    session for another turn, which ends under a new id; within a turn every writer uses the same
    id, so the end is recorded once whoever writes it)."""
    return "ended" if turn <= 1 else f"ended-{turn}"


def text_of(content: Sequence[Mapping[str, Any]], sep: str = "") -> str:
    """The text blocks of a model reply's content, joined by `sep` and stripped."""
    return sep.join(str(b.get("text", "")) for b in content if b.get("type") == "text").strip()


def to_builtins(obj: msgspec.Struct) -> Any:
    """A JSON-ready dict of any event or record (for `--json` output)."""
    if isinstance(obj, UnknownEvent):
        return {**obj.data, "type": obj.type, "id": obj.id, "ts": obj.ts, "v": obj.v}
    if isinstance(obj, InvalidEvent):
        return {"type": "invalid", **msgspec.to_builtins(obj)}
    if isinstance(obj, Record):
        return {
            "seq": obj.seq,
            "session_id": obj.session_id,
            "channel": obj.channel,
            **({"sender": obj.sender} if obj.sender else {}),
            "event": to_builtins(obj.event),
        }
    return msgspec.to_builtins(obj)


def event_type(event: LogEvent) -> str:
    if isinstance(event, UnknownEvent):
        return event.type
    if isinstance(event, InvalidEvent):
        return "invalid"
    return str(event.__struct_config__.tag)


def _preview(data: bytes, limit: int = 200) -> str:
    return data[:limit].decode("utf-8", errors="replace")
