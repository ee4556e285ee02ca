"""Model backends behind one `ModelClient` protocol: the Anthropic API, or a scripted offline model.

`model_from_spec("anthropic:<model-id>")` or `model_from_spec("scripted:<path>")` picks one.
Prices live in `agentbus.pricing` (`cost_usd` is re-exported here for older callers). The
anthropic SDK is imported only when an `AnthropicModel` is made, so `agentbus tap` and
`agentbus --help` never pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import msgspec

from agentbus.errors import AgentBusError, UsageError
from agentbus.messages import Usage
from agentbus.pricing import PRICES, Price, cost_usd, price_for

if TYPE_CHECKING:
    import anthropic

__all__ = [
    "PRICES",
    "AnthropicModel",
    "ModelClient",
    "ModelError",
    "ModelReply",
    "Partial",
    "Price",
    "ScriptedModel",
    "cost_usd",
    "model_from_spec",
    "price_for",
]

_EPHEMERAL: dict[str, str] = {"type": "ephemeral"}
# Fields the API accepts back when a block is replayed in a later request; anything else
# (e.g. `caller`, `parsed_output`) is response-only and would be rejected or break the cache prefix.
_REPLAY_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("type", "text", "citations"),
    "tool_use": ("type", "id", "name", "input"),
    "thinking": ("type", "thinking", "signature"),
    "redacted_thinking": ("type", "data"),
}
# The HTTP status the API pairs with each error type, for errors that arrive inside a stream.
_STATUS_FOR_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# The SDK refuses a non-streaming call whose worst case exceeds 10 minutes at its assumed
# 128k tokens per hour; above this many max_tokens we stream instead.
_NONSTREAMING_MAX_TOKENS = 21_333


class ModelError(AgentBusError):
    """A model call failed for good (after the SDK's own retries).

    Attributes:
        status: the HTTP status, or None when no response arrived (connection failure).
        retryable: whether trying again later may succeed (rate limit, overload, outage).
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ModelReply(msgspec.Struct, frozen=True):
    """One model response, with content blocks as plain dicts ready to append to the conversation."""

    content: tuple[dict[str, Any], ...]
    stop_reason: str | None
    usage: Usage
    model: str


class Partial:
    """What a model call produced before it was cancelled (an interrupt): text so far, usage so far."""

    def __init__(self) -> None:
        self.content: tuple[dict[str, Any], ...] = ()
        self.usage = Usage()
        self.model = ""

    def capture(self, message: Any) -> None:
        """From an SDK message snapshot: the text blocks (a tool call cut short is never kept)."""
        blocks = [b.model_dump(exclude_none=True) for b in getattr(message, "content", None) or ()]
        self.content = tuple(_replayable(b) for b in blocks if b.get("type") == "text" and b.get("text"))
        self.usage = _usage_from(getattr(message, "usage", None) or {})
        self.model = str(getattr(message, "model", "") or "")


class ModelClient(Protocol):
    """What the agent needs from a model: one call from a conversation to a reply."""

    name: str  # e.g. "anthropic:claude-sonnet-4-6"; recorded in the session log

    async def respond(
        self,
        *,
        session_id: str,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        max_tokens: int,
        partial: Partial | None = None,
    ) -> ModelReply:
        """One call. With `partial`, the call streams and keeps what arrived so far in it, so a
        cancelled call (an interrupt) still shows what the model had said."""
        ...


# -- shared helpers -----------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """A deep copy with every dict's keys sorted (tuples become lists, as JSON has only arrays).

    Prompt caching is a byte-exact prefix match, so the same conversation must serialise to
    the same bytes whatever order the caller built its dicts in.
    """
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _without_breakpoint(block: Any) -> Any:
    """A canonical block with any caller-set `cache_control` removed, so ours stay within the API's 4.

    Only the block's own key goes: a tool input or schema property that happens to be named
    `cache_control` is data and is kept.
    """
    out = _canonical(block)
    if isinstance(out, dict):
        out.pop("cache_control", None)
        if out.get("type") == "tool_result" and isinstance(out.get("content"), list):
            out["content"] = [_without_breakpoint(b) for b in out["content"]]
    return out


def _replayable(block: Mapping[str, Any]) -> dict[str, Any]:
    """A response block reduced to the fields the API accepts back, keys sorted."""
    fields = _REPLAY_FIELDS.get(str(block.get("type")))
    kept = {k: v for k, v in block.items() if v is not None and (fields is None or k in fields)}
    if not kept.get("citations", True):
        del kept["citations"]  # an empty citations list is noise in the replayed prompt
    return dict(_canonical(kept))


def _usage_from(raw: Any) -> Usage:
    """Our Usage from an SDK usage object or a JSON dict; missing cache counts are 0."""

    def get(name: str) -> int:
        value = raw.get(name) if isinstance(raw, Mapping) else getattr(raw, name, None)
        return int(value or 0)

    return Usage(
        input_tokens=get("input_tokens"),
        output_tokens=get("output_tokens"),
        cache_creation_input_tokens=get("cache_creation_input_tokens"),
        cache_read_input_tokens=get("cache_read_input_tokens"),
    )


# -- Anthropic ----------------------------------------------------------------------


class AnthropicModel:
    """Claude through the Anthropic Messages API, with prompt caching and deterministic requests.

    Args:
        model: the API model id, e.g. ``claude-sonnet-4-6``.
        api_key: defaults to ``ANTHROPIC_API_KEY`` (read by the SDK).
        base_url: defaults to ``ANTHROPIC_BASE_URL`` or the public API (read by the SDK).
        max_retries: SDK retries for 408/409/429/5xx and connection errors, honouring retry-after.
        timeout: per-request timeout in seconds; None keeps the SDK default (10 minutes).
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_retries: int = 4,
        timeout: float | None = None,
    ) -> None:
        self.model = model
        self.name = f"anthropic:{model}"
        options: dict[str, Any] = {"max_retries": max_retries}
        if api_key is not None:
            options["api_key"] = api_key
        if base_url is not None:
            options["base_url"] = base_url
        if timeout is not None:
            options["timeout"] = timeout
        if not (api_key or os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            # Caught here, once, instead of failing every session five times at request time.
            raise UsageError(
                f"anthropic:{model} needs ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN); "
                "to run offline use --model scripted:FILE"
            )
        import anthropic  # here, not at the top: only a process that calls Claude pays for the SDK

        self._client = anthropic.AsyncAnthropic(**options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()

    def build_request(
        self, *, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int
    ) -> dict[str, Any]:
        """The request parameters: canonical, with cache breakpoints on tools, system and the last turn."""
        request: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens}
        request["messages"] = _cached_messages(messages)
        if system:  # the API rejects an empty text block
            request["system"] = [{"type": "text", "text": system, "cache_control": dict(_EPHEMERAL)}]
        if tools:
            request["tools"] = _cached_tools(tools)
        return request

    async def respond(
        self,
        *,
        session_id: str,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        max_tokens: int,
        partial: Partial | None = None,
    ) -> ModelReply:
        """One Messages API call; raises `ModelError` once the SDK's retries are spent."""
        import anthropic  # loaded by the constructor already; a dictionary lookup here

        request = self.build_request(system=system, messages=messages, tools=tools, max_tokens=max_tokens)
        try:
            if partial is not None or _must_stream(self.model, max_tokens):
                message = await self._streamed(request, partial)
            else:
                message = await self._client.messages.create(**request)
        except anthropic.APIStatusError as err:
            raise _status_error(self.name, err) from err
        except anthropic.APIConnectionError as err:
            raise ModelError(f"{self.name}: {err.message}", status=None, retryable=True) from err
        return ModelReply(
            content=tuple(_replayable(block.model_dump(exclude_none=True)) for block in message.content),
            stop_reason=message.stop_reason,
            usage=_usage_from(message.usage),
            model=message.model,
        )

    async def _streamed(self, request: dict[str, Any], partial: Partial | None) -> Any:
        """A streamed call; if it is cancelled, what arrived so far goes into `partial` and the
        HTTP request is closed (the server sees the connection go)."""
        async with self._client.messages.stream(**request) as stream:
            try:
                return await stream.get_final_message()
            except asyncio.CancelledError:
                if partial is not None:
                    with contextlib.suppress(Exception):  # nothing arrived yet: no snapshot
                        partial.capture(stream.current_message_snapshot)
                raise


def _cached_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools sorted by name, the last one marking the end of the stable tool prefix."""
    out: list[dict[str, Any]] = sorted((_without_breakpoint(t) for t in tools), key=lambda t: str(t.get("name", "")))
    out[-1]["cache_control"] = dict(_EPHEMERAL)
    return out


def _cached_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation, with a breakpoint on its last block so the next call reads it from cache."""
    out: list[dict[str, Any]] = _canonical(messages)
    for message in out:
        if isinstance(message.get("content"), list):
            message["content"] = [_without_breakpoint(b) for b in message["content"]]
    if not out:
        return out
    last = out[-1]
    if isinstance(last.get("content"), str):
        if not last["content"]:
            return out  # an empty string cannot carry a breakpoint
        last["content"] = [{"type": "text", "text": last["content"]}]
    blocks = last.get("content")
    tail = blocks[-1] if isinstance(blocks, list) and blocks else None
    # the API refuses cache_control on thinking blocks; they only end a prefill turn anyway
    if isinstance(tail, dict) and tail.get("type") not in ("thinking", "redacted_thinking"):
        tail["cache_control"] = dict(_EPHEMERAL)
    return out


def _sdk_nonstreaming_tokens() -> dict[str, int]:
    """The SDK's own table of models that must stream above a token count; private, so optional."""
    try:
        from anthropic._constants import MODEL_NONSTREAMING_TOKENS
    except ImportError:  # pragma: no cover - older or newer SDK layout
        return {}
    return dict(MODEL_NONSTREAMING_TOKENS)


def _must_stream(model: str, max_tokens: int) -> bool:
    """Whether the SDK would refuse this as a non-streaming call (it may take over 10 minutes)."""
    limit = _sdk_nonstreaming_tokens().get(model)
    return max_tokens > _NONSTREAMING_MAX_TOKENS or (limit is not None and max_tokens > limit)


def _error_field(body: object, field: str) -> Any:
    """`error.<field>` from an API error body, or None."""
    error = body.get("error") if isinstance(body, Mapping) else None
    return error.get(field) if isinstance(error, Mapping) else None


def _error_type(body: object) -> str | None:
    kind = _error_field(body, "type")
    return str(kind) if kind is not None else None


def _status_error(name: str, err: anthropic.APIStatusError) -> ModelError:
    """A ModelError carrying the API's own error message and whether a later retry may help."""
    body, status, where = err.body, err.status_code, "HTTP"
    if status < 400:
        # An `error` event inside a 200 stream (e.g. overloaded mid-response) names its kind only
        # in the body; report the status the API uses for that kind so callers can branch on it.
        status, where = _STATUS_FOR_ERROR_TYPE.get(_error_type(body) or "", 500), "stream error, as HTTP"
    detail = _error_field(body, "message")
    message = str(detail) if detail else err.message
    retryable = status in (408, 409, 429) or status >= 500
    return ModelError(f"{name}: {where} {status}: {message}", status=status, retryable=retryable)


# -- scripted -----------------------------------------------------------------------


class ScriptedModel:
    """An offline model replaying a JSON list of Messages API response bodies, in order per session.

    The position in the script is the number of assistant turns already in the conversation, not
    process memory, so a session resumed in another process gets the right next response.
    A file may also hold several scripts, each chosen by a regular expression on the session's
    first user message: `{"scripts": [{"match": "...", "responses": [...]}], "responses": [...]}`
    (the top-level list is the fallback), so parents, children and graders can differ.
    A body may carry `"delay_s": N`: the reply then takes N seconds, like a real model call, which
    leaves time to steer a session or kill its agent by hand (agentbus/scripted/slow.json).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = bundled_script(str(path)) or Path(path)
        self.name = f"scripted:{path}"
        self._scripts = _load_scripts(self.path)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release; here so every backend can be closed the same way."""

    async def respond(
        self,
        *,
        session_id: str,
        system: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        max_tokens: int,
        partial: Partial | None = None,
    ) -> ModelReply:
        """The scripted response for this point in the conversation."""
        index = sum(1 for m in messages if m.get("role") == "assistant")
        first = json.dumps(messages[0].get("content")) if messages else ""
        responses = next((r for pattern, r in self._scripts if pattern is None or pattern.search(first)), [])
        if index >= len(responses):
            return ModelReply(
                content=({"type": "text", "text": "(scripted model: script exhausted)"},),
                stop_reason="end_turn",
                usage=Usage(),
                model="scripted",
            )
        body = responses[index]
        if body.get("delay_s"):
            await asyncio.sleep(float(body["delay_s"]))
        content = body["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        return ModelReply(
            content=tuple(_replayable(b) for b in blocks),
            stop_reason=body.get("stop_reason"),
            usage=_usage_from(body.get("usage") or {}),
            # priced as the model the script names, if any; "scripted" costs nothing
            model=str(body.get("model") or "scripted"),
        )


def bundled_script(name: str) -> Path | None:
    """`scripted:demo` names a script shipped in the package (agentbus/scripted/demo.json), so an
    offline model works the same in a container as in a checkout."""
    if "/" in name or name.endswith(".json"):
        return None
    candidate = Path(str(files("agentbus") / "scripted" / f"{name}.json"))
    return candidate if candidate.is_file() else None


def _load_scripts(path: Path) -> list[tuple[re.Pattern[str] | None, list[dict[str, Any]]]]:
    """(pattern, responses) pairs, the fallback (pattern None) last."""
    try:
        data: Any = json.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"cannot read model script {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise UsageError(f"model script {path} is not valid JSON: {err}") from err
    scripts: list[tuple[re.Pattern[str] | None, list[dict[str, Any]]]] = []
    if isinstance(data, dict):
        for i, entry in enumerate(data.get("scripts") or []):
            try:
                pattern = re.compile(str(entry["match"]))
            except (KeyError, TypeError, re.error) as err:
                raise UsageError(f"model script {path}: scripts[{i}] needs a valid `match` regex ({err})") from err
            scripts.append((pattern, _check_responses(path, entry.get("responses"))))
        if "responses" in data or not scripts:
            scripts.append((None, _check_responses(path, data.get("responses"))))
    else:
        scripts.append((None, _check_responses(path, data)))
    return scripts


def _check_responses(path: Path, responses: Any) -> list[dict[str, Any]]:
    """The response bodies of one script: a JSON list of bodies with content."""
    if not isinstance(responses, list):
        raise UsageError(f'model script {path} must be a JSON list or {{"responses": [...]}}')
    for i, body in enumerate(responses):
        if not isinstance(body, dict) or not isinstance(body.get("content"), list | str):
            raise UsageError(f"model script {path}: response {i} needs a content list")
        if not isinstance(body.get("delay_s", 0), int | float) or body.get("delay_s", 0) < 0:
            raise UsageError(f"model script {path}: response {i}: delay_s must be a number of seconds")
    return responses


# -- entry point --------------------------------------------------------------------


def model_from_spec(spec: str) -> ModelClient:
    """The backend a spec names: ``anthropic:<model-id>`` or ``scripted:<path>``."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UsageError(f"bad model spec {spec!r}: expected anthropic:<model-id> or scripted:<path>")
    if scheme == "anthropic":
        return AnthropicModel(rest)
    if scheme == "scripted":
        return ScriptedModel(rest)
    raise UsageError(f"unknown model scheme {scheme!r} in {spec!r}: use anthropic:<model-id> or scripted:<path>")
