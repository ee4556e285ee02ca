"""Model backends, exercised through the real anthropic SDK against `FakeMessagesAPI` over HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentbus.errors import UsageError
from agentbus.messages import Usage
from agentbus.models import (
    PRICES,
    AnthropicModel,
    ModelError,
    ModelReply,
    ScriptedModel,
    cost_usd,
    model_from_spec,
)
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response

pytestmark = pytest.mark.timeout(30)

MODEL_ID = "claude-sonnet-4-6"
TOOLS: list[dict[str, Any]] = [
    {"name": "write_file", "description": "Write a file", "input_schema": {"type": "object"}},
    {"name": "bash", "description": "Run a command", "input_schema": {"type": "object"}},
    {"name": "read_file", "description": "Read a file", "input_schema": {"type": "object"}},
]
HELLO: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def api() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as fake:
        yield fake


@pytest.fixture
async def model(api: FakeMessagesAPI) -> AsyncIterator[AnthropicModel]:
    async with AnthropicModel(MODEL_ID, api_key="test-key", base_url=api.base_url, max_retries=2) as m:
        yield m


async def ask(
    model: AnthropicModel,
    messages: list[dict[str, Any]] = HELLO,
    *,
    tools: list[dict[str, Any]] = TOOLS,
    system: str = "You are terse.",
    max_tokens: int = 1024,
) -> ModelReply:
    return await model.respond(session_id="s1", system=system, messages=messages, tools=tools, max_tokens=max_tokens)


def count_breakpoints(value: Any) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(count_breakpoints(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_breakpoints(v) for v in value)
    return 0


# -- AnthropicModel: replies ---------------------------------------------------------


async def test_text_reply_comes_back_as_plain_dict_blocks(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    api.script([text_response("hi there")])
    reply = await ask(model)
    assert reply == ModelReply(
        content=({"type": "text", "text": "hi there"},),
        stop_reason="end_turn",
        usage=Usage(input_tokens=10, output_tokens=5),
        model=MODEL_ID,
    )
    assert model.name == f"anthropic:{MODEL_ID}"


async def test_tool_use_reply_records_every_kind_of_token(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    usage = {
        "input_tokens": 12,
        "output_tokens": 34,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 9000,
    }
    api.script([tool_use_response("bash", {"cmd": "ls", "cwd": "/"}, id="toolu_1", text="Let me look.", usage=usage)])
    reply = await ask(model)
    assert reply.stop_reason == "tool_use"
    assert reply.content == (
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"cmd": "ls", "cwd": "/"}},
    )
    assert reply.usage == Usage(
        input_tokens=12, output_tokens=34, cache_creation_input_tokens=1500, cache_read_input_tokens=9000
    )


async def test_reply_content_is_accepted_back_in_the_next_request(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    api.script([tool_use_response("bash", {"cmd": "ls"}, id="toolu_1"), text_response("done")])
    first = await ask(model)
    conversation = [
        *HELLO,
        {"role": "assistant", "content": list(first.content)},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}]},
    ]
    second = await ask(model, conversation)
    assert second.content == ({"type": "text", "text": "done"},)
    sent = api.requests[1][0]["messages"]
    assert sent[1]["content"] == [{"id": "toolu_1", "input": {"cmd": "ls"}, "name": "bash", "type": "tool_use"}]


# -- AnthropicModel: retries and errors ----------------------------------------------


async def test_rate_limit_is_retried_after_the_servers_retry_after(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    api.fail(429, retry_after=0.01)
    api.script([text_response("ok")])
    reply = await ask(model)
    assert reply.content == ({"type": "text", "text": "ok"},)
    assert len(api.requests) == 2
    assert api.requests[1][1]["x-stainless-retry-count"] == "1"


@pytest.mark.parametrize("status", [529, 500])
async def test_overload_and_server_errors_are_retried(api: FakeMessagesAPI, model: AnthropicModel, status: int) -> None:
    api.fail(status, retry_after=0.01)
    api.script([text_response("ok")])
    reply = await ask(model)
    assert reply.content == ({"type": "text", "text": "ok"},)
    assert len(api.requests) == 2


async def test_bad_request_raises_model_error_with_the_api_message_and_is_not_retried(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    api.fail(400, message="messages.0.content: text content blocks must be non-empty")
    with pytest.raises(ModelError, match="text content blocks must be non-empty") as info:
        await ask(model)
    assert info.value.status == 400
    assert info.value.retryable is False
    assert len(api.requests) == 1


async def test_retries_running_out_raise_a_retryable_model_error(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    api.fail(529, retry_after=0.01, times=3, message="Overloaded")
    with pytest.raises(ModelError, match="Overloaded") as info:
        await ask(model)
    assert (info.value.status, info.value.retryable) == (529, True)
    assert len(api.requests) == 3  # the first try and max_retries=2


async def test_unreachable_api_raises_a_retryable_model_error_without_status() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with AnthropicModel(MODEL_ID, api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=0) as m:
        with pytest.raises(ModelError) as info:
            await ask(m)
    assert (info.value.status, info.value.retryable) == (None, True)


async def test_an_empty_script_fails_loudly(api: FakeMessagesAPI) -> None:
    async with AnthropicModel(MODEL_ID, api_key="k", base_url=api.base_url, max_retries=0) as m:
        with pytest.raises(ModelError, match="no scripted response left"):
            await ask(m)


# -- AnthropicModel: the request ------------------------------------------------------


async def test_request_marks_cache_breakpoints_on_last_tool_system_and_last_message(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    api.script([text_response("ok")])
    await ask(model)
    body, headers = api.requests[0]
    assert "test-key" in headers.get("x-api-key", headers.get("authorization", ""))
    assert [t["name"] for t in body["tools"]] == ["bash", "read_file", "write_file"]
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["system"] == [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}],
        }
    ]
    assert count_breakpoints(body) == 3


async def test_callers_own_breakpoints_are_replaced_so_the_limit_of_four_holds(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    marked = {"type": "ephemeral"}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": f"turn {i}", "cache_control": marked}]}
        if i % 2 == 0
        else {
            "role": "assistant",
            "content": [{"type": "text", "text": f"turn {i}", "cache_control": marked}],
        }
        for i in range(5)
    ]
    tools = [{**t, "cache_control": marked} for t in TOOLS]
    api.script([text_response("ok")])
    await ask(model, messages, tools=tools)  # the fake API rejects more than 4, as the real one does
    assert count_breakpoints(api.requests[0][0]) == 3


async def test_tool_input_named_cache_control_is_data_and_kept(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    conversation = [
        *HELLO,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "bash", "input": {"cache_control": 1}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
    ]
    api.script([text_response("ok")])
    await ask(model, conversation)
    assert api.requests[0][0]["messages"][1]["content"][0]["input"] == {"cache_control": 1}


async def test_identical_conversations_serialise_to_identical_bytes(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    def conversation(reverse: bool) -> list[dict[str, Any]]:
        tool_input = {"path": "a.txt", "mode": "w", "opts": {"z": 1, "a": 2}}
        if reverse:  # same content, dicts built in another order
            tool_input = {"opts": {"a": 2, "z": 1}, "mode": "w", "path": "a.txt"}
        return [
            *HELLO,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "write_file", "input": tool_input}],
            },
            {"role": "user", "content": [{"tool_use_id": "t1", "type": "tool_result", "content": "written"}]},
        ]

    api.script([text_response("a"), text_response("b")])
    await ask(model, conversation(False))
    await ask(model, conversation(True), tools=list(reversed(TOOLS)))
    first, second = api.raw_bodies
    assert first == second
    assert b'"input":{"mode":"w","opts":{"a":2,"z":1},"path":"a.txt"}' in first


async def test_large_max_tokens_streams_and_reassembles_every_block(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    usage = {"input_tokens": 7, "output_tokens": 99, "cache_read_input_tokens": 500}
    api.script(
        [
            {
                "content": [
                    {"type": "thinking", "thinking": "I should list files.", "signature": "sig=="},
                    {"type": "text", "text": "Listing the files now."},
                    {
                        "type": "tool_use",
                        "id": "toolu_9",
                        "name": "bash",
                        "input": {"cmd": "ls -la", "n": [1, 2]},
                    },
                ],
                "stop_reason": "tool_use",
                "usage": usage,
            }
        ]
    )
    reply = await ask(model, max_tokens=32_000)  # above what the SDK allows without streaming
    assert api.requests[0][0]["stream"] is True
    assert reply.content == (
        {"type": "thinking", "thinking": "I should list files.", "signature": "sig=="},
        {"type": "text", "text": "Listing the files now."},
        {"type": "tool_use", "id": "toolu_9", "name": "bash", "input": {"cmd": "ls -la", "n": [1, 2]}},
    )
    assert reply.stop_reason == "tool_use"
    assert reply.usage == Usage(input_tokens=7, output_tokens=99, cache_read_input_tokens=500)


async def test_overload_in_the_middle_of_a_stream_raises_a_retryable_model_error(
    api: FakeMessagesAPI, model: AnthropicModel
) -> None:
    api.fail(529, message="Overloaded", during_stream=True)
    with pytest.raises(ModelError, match="Overloaded") as info:
        await ask(model, max_tokens=32_000)
    assert (info.value.status, info.value.retryable) == (529, True)
    assert len(api.requests) == 1  # a stream that already started is not retried by the SDK


async def test_small_max_tokens_does_not_stream(api: FakeMessagesAPI, model: AnthropicModel) -> None:
    api.script([text_response("ok")])
    await ask(model, max_tokens=4096)
    assert "stream" not in api.requests[0][0]


async def test_fake_api_can_compute_replies_from_the_request() -> None:
    def echo(request: dict[str, Any]) -> dict[str, Any]:
        return text_response(f"you said {request['messages'][-1]['content'][0]['text']}")

    with FakeMessagesAPI(responder=echo) as api:
        async with AnthropicModel(MODEL_ID, api_key="k", base_url=api.base_url, max_retries=0) as m:
            reply = await ask(m, [{"role": "user", "content": "ping"}])
    assert reply.content == ({"type": "text", "text": "you said ping"},)


# -- ScriptedModel -------------------------------------------------------------------


@pytest.fixture
def script_path(tmp_path: Path) -> Path:
    path = tmp_path / "script.json"
    path.write_text(
        json.dumps(
            [
                tool_use_response("bash", {"cmd": "ls"}, id="toolu_a"),
                {**text_response("all done"), "model": "claude-haiku-4-5"},
            ]
        )
    )
    return path


def after_turns(n: int) -> list[dict[str, Any]]:
    """A conversation with n assistant turns already in it."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for i in range(n):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"turn {i}"}]})
        messages.append({"role": "user", "content": "continue"})
    return messages


async def scripted(model: ScriptedModel, session_id: str, turns: int) -> ModelReply:
    return await model.respond(session_id=session_id, system="", messages=after_turns(turns), tools=[], max_tokens=100)


async def test_scripted_model_serves_every_session_from_the_start(script_path: Path) -> None:
    model = ScriptedModel(script_path)
    a0, b0, a1 = await scripted(model, "a", 0), await scripted(model, "b", 0), await scripted(model, "a", 1)
    assert a0 == b0
    assert a0.content == ({"type": "tool_use", "id": "toolu_a", "name": "bash", "input": {"cmd": "ls"}},)
    assert a0.stop_reason == "tool_use"
    assert a1.content == ({"type": "text", "text": "all done"},)
    assert model.name == f"scripted:{script_path}"


async def test_resumed_scripted_session_continues_from_its_assistant_turn_count(script_path: Path) -> None:
    fresh_process_model = ScriptedModel(script_path)  # no memory of earlier calls
    reply = await scripted(fresh_process_model, "resumed", 1)
    assert reply.content == ({"type": "text", "text": "all done"},)
    assert reply.model == "claude-haiku-4-5"


async def test_scripted_model_says_so_when_the_script_is_exhausted(script_path: Path) -> None:
    reply = await scripted(ScriptedModel(script_path), "a", 2)
    assert reply.content == ({"type": "text", "text": "(scripted model: script exhausted)"},)
    assert reply.stop_reason == "end_turn"
    assert cost_usd(reply.model, reply.usage) == 0.0


async def test_scripted_model_accepts_a_responses_object(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"responses": [text_response("hi")]}))
    reply = await scripted(ScriptedModel(path), "a", 0)
    assert reply.content == ({"type": "text", "text": "hi"},)
    assert reply.usage == Usage(input_tokens=10, output_tokens=5)


@pytest.mark.parametrize("text", ["not json", '{"nope": 1}', '[{"stop_reason": "end_turn"}]'])
def test_malformed_script_is_a_usage_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UsageError, match="model script"):
        ScriptedModel(path)


def test_missing_script_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read model script"):
        ScriptedModel(tmp_path / "absent.json")


# -- pricing -------------------------------------------------------------------------


def test_cost_prices_each_kind_of_token_at_its_own_rate() -> None:
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=1_000_000,
        cache_read_input_tokens=1_000_000,
    )
    assert cost_usd("claude-sonnet-4-6", usage) == pytest.approx(3.0 + 15.0 + 3.75 + 0.30)
    assert cost_usd("anthropic:claude-sonnet-4-6", Usage(cache_read_input_tokens=1_000_000)) == pytest.approx(0.30)
    assert cost_usd("claude-haiku-4-5", Usage(cache_creation_input_tokens=1_000_000)) == pytest.approx(1.25)


def test_cache_rates_follow_the_input_price_in_every_family() -> None:
    for price in PRICES.values():
        assert price.cache_write_5m == pytest.approx(1.25 * price.input)
        assert price.cache_read == pytest.approx(0.1 * price.input)


def test_the_most_specific_model_family_price_wins() -> None:
    one_m_in = Usage(input_tokens=1_000_000)
    assert cost_usd("claude-opus-4-1-20250805", one_m_in) == pytest.approx(15.0)
    assert cost_usd("claude-opus-4-5-20251101", one_m_in) == pytest.approx(5.0)
    assert cost_usd("claude-3-5-haiku-20241022", one_m_in) == pytest.approx(0.8)


def test_unknown_and_scripted_models_cost_nothing() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)
    assert cost_usd("gpt-4o", usage) == 0.0
    assert cost_usd("scripted", usage) == 0.0


# -- model_from_spec -----------------------------------------------------------------


async def test_model_from_spec_builds_each_backend(script_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    anthropic_model = model_from_spec(f"anthropic:{MODEL_ID}")
    assert isinstance(anthropic_model, AnthropicModel)
    await anthropic_model.aclose()
    assert anthropic_model.name == f"anthropic:{MODEL_ID}"
    scripted_model = model_from_spec(f"scripted:{script_path}")
    assert isinstance(scripted_model, ScriptedModel)
    assert scripted_model.name == f"scripted:{script_path}"


def test_an_anthropic_model_without_a_key_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with pytest.raises(UsageError, match=r"ANTHROPIC_API_KEY.*scripted"):
        model_from_spec(f"anthropic:{MODEL_ID}")


@pytest.mark.parametrize("spec", ["openai:gpt-4o", "claude-sonnet-4-6", "anthropic:", ""])
def test_model_from_spec_rejects_unknown_or_incomplete_specs(spec: str) -> None:
    with pytest.raises(UsageError):
        model_from_spec(spec)


async def test_scripted_demo_names_the_script_shipped_in_the_package(tmp_path: Path) -> None:
    shipped = model_from_spec("scripted:demo")
    assert isinstance(shipped, ScriptedModel)
    assert shipped.path.name == "demo.json" and shipped.path.is_file()
    with pytest.raises(UsageError, match="cannot read model script"):
        model_from_spec("scripted:no-such-script")
