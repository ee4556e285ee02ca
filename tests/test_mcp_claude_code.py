"""The real Claude Code CLI (bundled in the `claude-agent-sdk` wheel) attaches to `agentbus mcp`: its model,
a fake Messages API, calls `mcp__agentbus__submit`, an agentbus agent does the work, and the result comes back
into the Claude Code conversation."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.helpers import POOL, agent_with_fake

AGENTBUS = str(Path(sys.executable).with_name("agentbus"))
SUBMIT = "mcp__agentbus__submit"
# Claude Code talks only to ANTHROPIC_BASE_URL: no telemetry, error reports, auto-update or other
# non-essential traffic (this machine reaches no other host, and a test must not try).
QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_BUG_COMMAND": "1",
    "ENABLE_TOOL_SEARCH": "false",  # else MCP tools hide behind a ToolSearch tool until the model looks them up
}


def claude_cli() -> Path:
    """The Claude Code CLI the claude-agent-sdk wheel ships (a skip, saying why, where it is missing)."""
    sdk = pytest.importorskip(
        "claude_agent_sdk", reason="claude-agent-sdk is not installed (make install adds it with the dev extras)"
    )
    cli = Path(sdk.__file__).parent / "_bundled" / "claude"
    if not os.access(cli, os.X_OK):
        pytest.skip(f"the claude-agent-sdk wheel for this platform ships no Claude Code CLI ({cli})")
    return cli


def _tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    last = request["messages"][-1]
    content = last["content"] if isinstance(last.get("content"), list) else []
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


def claude_code_model(request: dict[str, Any]) -> dict[str, Any]:
    """Claude Code's model: hand the task to agentbus, then report what came back. Requests that are not
    the conversation (a title, a quota probe) get a plain answer."""
    if not any(t.get("name") == SUBMIT for t in request.get("tools") or []):
        return text_response("ok")
    if results := _tool_results(request):
        return text_response(f"the fleet answered: {json.dumps(results[0]['content'])}")
    return tool_use_response(SUBMIT, {"prompt": "write a haiku about queues", "pool": POOL, "wait": 60})


async def test_claude_code_hands_a_task_to_agentbus_and_reads_the_result(
    settings: Settings, client: agentbus.Client, tmp_path: Path
) -> None:
    cli = claude_cli()
    home = tmp_path / "home"
    home.mkdir()
    servers = {"agentbus": {
        "command": AGENTBUS, "args": ["mcp", "--nats", settings.nats_url, "--prefix", settings.prefix],
        "env": {"AGENTBUS_CREDS": settings.creds, "PATH": os.environ["PATH"]},
    }}  # fmt: skip
    haiku = "queues wait in line / each message finds its reader / acked, then it is gone"
    async with agent_with_fake(settings, tmp_path / "work", lambda _: text_response(haiku)):
        with FakeMessagesAPI(responder=claude_code_model) as outer:
            env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": outer.base_url,
                   "ANTHROPIC_API_KEY": "test-key", **QUIET}  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                str(cli), "-p", "ask the agentbus fleet for a haiku about queues",
                "--output-format", "stream-json", "--verbose", "--model", "claude-sonnet-4-6",
                "--mcp-config", json.dumps({"mcpServers": servers}), "--strict-mcp-config",
                "--allowedTools", SUBMIT,
                env=env, cwd=home, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            conversation = [r for r, _ in outer.requests if any(t.get("name") == SUBMIT for t in r.get("tools") or [])]
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    init = next(m for m in lines if m.get("type") == "system" and m.get("subtype") == "init")
    assert [(s["name"], s["status"]) for s in init["mcp_servers"]] == [("agentbus", "connected")]

    sessions = await client.sessions()
    assert [(s.status, s.result, s.pool) for s in sessions] == [("completed", haiku, POOL)]
    assert len(conversation) == 2, "one request that calls submit, one that reads its result"
    (result,) = _tool_results(conversation[1])
    assert not result.get("is_error") and haiku in json.dumps(result["content"])
    assert sessions[0].session_id in json.dumps(result["content"])
    final = next(m for m in lines if m.get("type") == "result")
    assert final["subtype"] == "success" and haiku in final["result"]
