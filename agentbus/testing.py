"""Test helpers shipped with the package: a fake Anthropic Messages API over real HTTP.

`FakeMessagesAPI` listens on 127.0.0.1 (port 0, so tests never collide) and answers
`POST /v1/messages` from a FIFO script of response bodies and injected errors, or
from a `responder` callable. Pointing the real `anthropic` SDK at `.base_url`
exercises its retries, error mapping and streaming helper instead of a mock.
"""

from __future__ import annotations

import copy
import itertools
import json
import select
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import msgspec

__all__ = [
    "FakeMessagesAPI",
    "Responder",
    "text_response",
    "tool_use_response",
]

Responder = Callable[[dict[str, Any]], dict[str, Any]]
"""Computes a response body from a parsed request body."""

# The error `type` the real API sends with each status, so the SDK maps it to the same exception class.
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_MAX_CACHE_BREAKPOINTS = 4
_DEFAULT_USAGE: dict[str, int] = {"input_tokens": 10, "output_tokens": 5}


class _Failure(msgspec.Struct, frozen=True, kw_only=True):
    """One scripted error reply."""

    status: int
    error_type: str
    message: str
    retry_after: float | None = None
    # on a streaming request: answer 200, start the message, then send an `error` event,
    # as the real API does when it overloads mid-response
    during_stream: bool = False


class _Stall:
    """A reply that starts streaming `partial` and then waits for `release` (or for the client to go)."""

    def __init__(self, partial: str, release: threading.Event) -> None:
        self.partial = partial
        self.release = release


_Entry = dict[str, Any] | _Failure | _Stall


def text_response(
    text: str, *, stop_reason: str = "end_turn", usage: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """A Messages API response body holding one text block."""
    return {
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "usage": dict(usage if usage is not None else _DEFAULT_USAGE),
    }


def tool_use_response(
    name: str,
    input: Mapping[str, Any],
    *,
    id: str | None = None,
    text: str | None = None,
    usage: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A response body asking for one tool call (optionally preceded by a text block)."""
    block: dict[str, Any] = {"type": "tool_use", "name": name, "input": dict(input)}
    if id is not None:
        block["id"] = id
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text is not None else []
    content.append(block)
    return {
        "content": content,
        "stop_reason": "tool_use",
        "usage": dict(usage if usage is not None else _DEFAULT_USAGE),
    }


class FakeMessagesAPI:
    """A scripted stand-in for `POST /v1/messages`, served over real HTTP on 127.0.0.1.

    Replies come from one FIFO queue filled by `script()` and `fail()`; when it is empty the
    `responder` (if any) computes a reply, else the request gets a 500 so the test fails loudly.
    Every request is recorded in `requests` (parsed body, lower-cased headers) and `raw_bodies`.

    Args:
        responder: computes a response body from the parsed request once the queue is empty.
    """

    def __init__(self, *, responder: Responder | None = None) -> None:
        self._responder = responder
        self._lock = threading.Lock()
        self._queue: deque[_Entry] = deque()
        self._requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self._raw_bodies: list[bytes] = []
        self._ids = itertools.count(1)
        self._disconnects = 0
        self.stalled = threading.Event()  # set when a stalled reply has sent its partial text
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> FakeMessagesAPI:
        """Bind a free port and serve in a background thread; returns self."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        # a short poll interval so stop() returns in milliseconds, not the default half second
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-messages-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeMessagesAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Where the SDK should send requests, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("FakeMessagesAPI is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- scripting -----------------------------------------------------------------

    def script(self, responses: list[dict[str, Any]]) -> None:
        """Queue response bodies (each needs content, stop_reason, usage; the rest gets defaults)."""
        for body in responses:
            missing = {"content", "stop_reason", "usage"} - body.keys()
            if missing:
                raise ValueError(f"scripted response lacks {sorted(missing)}: {body!r}")
        with self._lock:
            self._queue.extend(copy.deepcopy(r) for r in responses)

    def fail(
        self,
        status: int,
        *,
        retry_after: float | None = None,
        times: int = 1,
        message: str | None = None,
        during_stream: bool = False,
    ) -> None:
        """Queue `times` error replies in the API's error shape, with `retry-after` when given.

        With `during_stream`, a streaming request gets a 200 and then an `error` event after
        `message_start` (the SDK cannot retry that); a non-streaming one gets the plain error.
        """
        error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        failure = _Failure(
            status=status,
            error_type=error_type,
            message=message if message is not None else f"fake API: injected {error_type}",
            retry_after=retry_after,
            during_stream=during_stream,
        )
        with self._lock:
            self._queue.extend([failure] * times)

    def stall(self, partial: str = "", *, release: threading.Event | None = None) -> threading.Event:
        """Queue a streamed reply that sends `partial` text, then holds until the returned event is set
        (and finishes as an `end_turn` with that text) or the client closes the connection, which
        `disconnects` counts: what an interrupted model call looks like from the server."""
        release = release or threading.Event()
        with self._lock:
            self._queue.append(_Stall(partial, release))
        return release

    @property
    def disconnects(self) -> int:
        """Stalled replies whose client closed the connection before they were released."""
        with self._lock:
            return self._disconnects

    @property
    def requests(self) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Every request received so far, as (parsed JSON body, lower-cased headers); a snapshot."""
        with self._lock:
            return list(self._requests)

    @property
    def raw_bodies(self) -> list[bytes]:
        """The request bodies byte for byte, to check serialisation is deterministic."""
        with self._lock:
            return list(self._raw_bodies)

    @property
    def pending(self) -> int:
        """How many scripted replies have not been served yet."""
        with self._lock:
            return len(self._queue)

    # -- serving (called from handler threads) ------------------------------------

    def _record(self, raw: bytes, body: dict[str, Any], headers: dict[str, str]) -> None:
        with self._lock:
            self._raw_bodies.append(raw)
            self._requests.append((body, headers))

    def _next_reply(self, request: dict[str, Any]) -> _Entry:
        """The reply for one valid request: queue first, then the responder, else a loud 500."""
        with self._lock:
            entry = self._queue.popleft() if self._queue else None
        if entry is None and self._responder is not None:
            entry = self._responder(request)
        if entry is None:
            return _Failure(status=500, error_type="api_error", message="fake API: no scripted response left")
        if isinstance(entry, _Failure | _Stall):
            return entry
        return self._complete(entry, request)

    def _complete(self, body: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        """Fill the fields a real response always has, so the SDK's models validate."""
        n = next(self._ids)
        out = copy.deepcopy(body)
        out.setdefault("id", f"msg_fake_{n:04d}")
        out.setdefault("type", "message")
        out.setdefault("role", "assistant")
        out.setdefault("model", request.get("model", "claude-fake"))
        out.setdefault("stop_sequence", None)
        out["usage"] = {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            **out.get("usage", {}),
        }
        for i, block in enumerate(out["content"]):
            if block.get("type") == "tool_use":
                block.setdefault("id", f"toolu_fake_{n:04d}_{i}")
        return out


def _validate(body: Any) -> str | None:
    """The first thing the real API would reject with a 400, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            return f"{field}: Field required"
    found = _count_cache_control(body.get("tools")) + _count_cache_control(body.get("system"))
    found += _count_cache_control(body.get("messages"))
    if found > _MAX_CACHE_BREAKPOINTS:
        return f"A maximum of {_MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. Found {found}."
    return None


def _count_cache_control(value: Any) -> int:
    if isinstance(value, dict):
        own = 1 if "cache_control" in value else 0
        return own + sum(_count_cache_control(v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(_count_cache_control(v) for v in value)
    return 0


def _sse_events(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The event sequence the real API streams for a finished message."""
    usage = message["usage"]
    start = {k: v for k, v in message.items() if k not in ("content", "stop_reason", "stop_sequence")}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage={**usage, "output_tokens": 1})
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    for index, block in enumerate(message["content"]):
        yield from _block_events(index, block)
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message.get("stop_sequence")},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def _block_events(index: int, block: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """start / deltas / stop for one content block, split into pieces like the real stream."""
    kind = block.get("type")
    if kind == "text":
        empty: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in _halves(block["text"])]
    elif kind == "tool_use":
        empty = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        raw = json.dumps(block.get("input", {}))
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in _halves(raw)]
    elif kind == "thinking":
        empty = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _halves(block.get("thinking", ""))]
        deltas.append({"type": "signature_delta", "signature": block.get("signature", "")})
    else:  # redacted_thinking and server blocks arrive whole in content_block_start
        empty, deltas = block, []
    yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}
    for delta in deltas:
        yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": index}


def _halves(text: str) -> list[str]:
    """Two pieces, so consumers must concatenate deltas rather than take the first one."""
    mid = len(text) // 2
    return [p for p in (text[:mid], text[mid:]) if p]


def _closed(sock: Any) -> bool:
    """The peer has closed the connection (readable with nothing to read)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK) == b"")
    except OSError:
        return True


def _handler_for(api: FakeMessagesAPI) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one FakeMessagesAPI."""

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so an SSE body simply ends when the socket closes.
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body: Any = json.loads(raw or b"null")
            except ValueError:
                body = None
            api._record(raw, body if isinstance(body, dict) else {}, headers)
            if self.path.split("?")[0] != "/v1/messages":
                self._send_error(_Failure(status=404, error_type="not_found_error", message="Not found"))
                return
            problem = _validate(body)
            if problem is not None:
                self._send_error(_Failure(status=400, error_type="invalid_request_error", message=problem))
                return
            reply = api._next_reply(body)
            try:
                if isinstance(reply, _Stall):
                    self._send_stall(reply, body)
                elif isinstance(reply, _Failure) and reply.during_stream and body.get("stream"):
                    self._send_stream_error(reply, body)
                elif isinstance(reply, _Failure):
                    self._send_error(reply)
                elif body.get("stream"):
                    self._send_stream(reply)
                else:
                    self._send_json(200, reply)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (a test killed it): nothing to answer

        def _send_stall(self, stall: _Stall, request: dict[str, Any]) -> None:
            message = api._complete(text_response(stall.partial), request)
            events = list(_sse_events(message)) if request.get("stream") else []
            if request.get("stream"):
                self.send_response(HTTPStatus.OK)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for event, data in events[:4]:  # message_start, ping, block start, the first half of the text
                    self._write_event(event, data)
                self.wfile.flush()
            api.stalled.set()
            while not stall.release.wait(0.02):
                if _closed(self.connection):
                    with api._lock:
                        api._disconnects += 1
                    return
            if not request.get("stream"):
                self._send_json(200, message)
                return
            for event, data in events[4:]:
                self._write_event(event, data)
            self.wfile.flush()

        def _send_json(self, status: int, payload: dict[str, Any], extra: Mapping[str, str] = {}) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_fake_{next(api._ids):04d}")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, failure: _Failure) -> None:
            extra = {"retry-after": str(failure.retry_after)} if failure.retry_after is not None else {}
            payload = {"type": "error", "error": {"type": failure.error_type, "message": failure.message}}
            self._send_json(failure.status, payload, extra)

        def _send_stream(self, message: dict[str, Any]) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            for event, data in _sse_events(message):
                self._write_event(event, data)
            self.wfile.flush()

        def _send_stream_error(self, failure: _Failure, request: dict[str, Any]) -> None:
            message = api._complete(text_response(""), request)
            self.send_response(HTTPStatus.OK)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self._write_event("message_start", next(_sse_events(message))[1])
            error = {"type": failure.error_type, "message": failure.message}
            self._write_event("error", {"type": "error", "error": error})
            self.wfile.flush()

        def _write_event(self, event: str, data: dict[str, Any]) -> None:
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

    return Handler
