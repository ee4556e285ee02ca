"""`agentbus mcp` as a real subprocess, driven by the real `mcp` client SDK over stdio and Streamable HTTP,
with an in-process agent on the fake Messages API doing the work."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPDeprecationWarning

import agentbus
from agentbus.config import Settings
from agentbus.testing import text_response
from tests.conftest import AsUser
from tests.helpers import POOL, Gate, agent_with_fake, free_port, until

AGENTBUS = str(Path(sys.executable).with_name("agentbus"))
TOOLS = {"submit", "result", "events", "say", "interrupt", "approve", "cancel", "resume", "inbox", "sessions", "pools"}


def _args(settings: Settings) -> list[str]:
    return ["mcp", "--nats", settings.nats_url, "--prefix", settings.prefix]


@asynccontextmanager
async def over_stdio(settings: Settings, tmp_path: Path, **client: Any) -> AsyncIterator[Client]:
    """The real command as the MCP client starts it: `agentbus mcp` on its standard input and output."""
    params = StdioServerParameters(
        command=AGENTBUS, args=_args(settings), env={**os.environ, "AGENTBUS_CREDS": settings.creds}
    )
    with (tmp_path / "mcp-stdio.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), **client) as c:
            yield c


@asynccontextmanager
async def http_server(settings: Settings, tmp_path: Path, *extra: str) -> AsyncIterator[str]:
    """`agentbus mcp --http` on a free loopback port; yields its URL once it accepts connections."""
    port = free_port()
    with (tmp_path / "mcp-http.log").open("w") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - polled and signalled, never awaited for output
            [AGENTBUS, *_args(settings), "--http", f"127.0.0.1:{port}", *extra],
            env={**os.environ, "AGENTBUS_CREDS": settings.creds}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await until(lambda: _accepts(port, proc), "agentbus mcp --http to listen", timeout=20)
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            proc.terminate()
            proc.wait(10)


async def _accepts(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "agentbus mcp --http exited"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@asynccontextmanager
async def over_http(url: str, token: str, **client: Any) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), **client) as c,
    ):
        yield c


@asynccontextmanager
async def connected(transport: str, settings: Settings, tmp_path: Path, **client: Any) -> AsyncIterator[Client]:
    if transport == "stdio":
        async with over_stdio(settings, tmp_path, **client) as c:
            yield c
        return
    token_file = tmp_path / "mcp.token"
    async with (
        http_server(settings, tmp_path, "--token-file", str(token_file)) as url,
        over_http(url, token_file.read_text().strip(), **client) as c,
    ):
        yield c


async def call(c: Client, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured content."""
    result = await c.call_tool(tool, args)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    assert result.content and isinstance(result.content[0], mcp_types.TextContent) and result.content[0].text
    return result.structured_content


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_submit_result_and_gapless_events_over_the_real_sdk(
    transport: str, settings: Settings, client: agentbus.Client, tmp_path: Path
) -> None:
    replies = iter([text_response("step one"), text_response("all done")])
    async with (
        agent_with_fake(settings, tmp_path / "work", lambda _: next(replies)) as (api, _),
        connected(transport, settings, tmp_path) as c,
    ):
        assert {t.name for t in (await c.list_tools()).tools} == TOOLS
        sid = (await call(c, "submit", prompt="write a haiku", pool=POOL))["session_id"]
        done = await call(c, "result", session_id=sid, timeout=30)
        assert (done["status"], done["result"], done["done"]) == ("completed", "step one", True)

        seen: list[int] = []
        after = 0
        for _ in range(50):  # one event per call: every call continues where the last stopped
            page = await call(c, "events", session_id=sid, after=after, limit=1)
            if not page["events"]:
                break
            seen += [e["seq"] for e in page["events"]]
            after = page["next_after"]
        assert seen == [r.seq for r in await client.show(sid)]
        assert len(api.requests) == 1

        bad = await c.call_tool("submit", {"prompt": 5, "pool": POOL})
        assert bad.is_error and bad.structured_content is not None
        assert bad.structured_content["error"]["exit_code"] == 2
        assert "prompt" in bad.structured_content["error"]["message"]
        unknown = await c.call_tool("result", {"session_id": "nosuchsession"})
        assert unknown.is_error and unknown.structured_content["error"]["code"] == "no_such_session"
        assert (await call(c, "sessions"))["sessions"][0]["session_id"] == sid  # the server lives on


async def test_say_reaches_the_next_request_and_a_listen_subscription_hears_the_end(
    settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        if gate.reached.is_set():
            return text_response("blue it is")
        gate.hold()
        return text_response("a draft")

    async with (
        agent_with_fake(settings, tmp_path / "work", respond, gates=(gate,)) as (api, _),
        over_stdio(settings, tmp_path) as c,
    ):
        sid = (await call(c, "submit", prompt="pick a colour", pool=POOL))["session_id"]
        uri = f"agentbus://session/{sid}"
        async with c.listen(resource_subscriptions=[uri]) as sub:
            await gate.wait_reached()
            said = await call(c, "say", session_id=sid, text="make it blue")
            gate.open()
            async with asyncio.timeout(30):
                async for event in sub:
                    assert event == ResourceUpdated(uri=uri)
                    body = (await c.read_resource(uri)).contents[0]
                    assert isinstance(body, mcp_types.TextResourceContents)
                    if '"status": "completed"' in body.text:
                        break
        assert (await call(c, "result", session_id=sid, timeout=0))["result"] == "blue it is"
        second = api.requests[1][0]["messages"]
        assert any("make it blue" in str(m["content"]) for m in second if m["role"] == "user")
        assert said["seq"] > 0


async def test_handshake_era_subscription_over_http_is_notified_when_the_session_ends(
    settings: Settings, tmp_path: Path
) -> None:
    gate = Gate()

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        gate.hold()
        return text_response("finished")

    updated: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            updated.append(message.params.uri)

    async with agent_with_fake(settings, tmp_path / "work", respond, gates=(gate,)):
        token_file = tmp_path / "mcp.token"
        async with (
            http_server(settings, tmp_path, "--token-file", str(token_file)) as url,
            over_http(url, token_file.read_text().strip(), mode="legacy", message_handler=on_message) as c,
        ):
            assert c.protocol_version == "2025-11-25"  # what Claude Code speaks
            sid = (await call(c, "submit", prompt="go", pool=POOL))["session_id"]
            uri = f"agentbus://session/{sid}"
            with warnings.catch_warnings():  # the SDK marks resources/subscribe as the old era's
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await c.subscribe_resource(uri)
            await gate.wait_reached()
            gate.open()

            async def ended() -> bool:
                if uri not in updated:
                    return False
                return (await call(c, "result", session_id=sid, timeout=0))["status"] == "completed"

            await until(ended, "a resources/updated notification and the session's end", timeout=30)


async def test_a_caller_without_rights_is_refused_with_its_role_named(
    settings: Settings, client: agentbus.Client, as_user: AsUser, tmp_path: Path
) -> None:
    sid = await client.submit("someone's work", pool=POOL)
    observer = as_user("olga", "observer", sessions=[sid])
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[callers.admin]\ntoken = "admin-secret-token"\ncreds = "{settings.creds}"\n'
        f'[callers.olga]\ntoken = "olga-secret-token"\ncreds = "{observer.creds}"\n'
    )
    tokens.chmod(0o600)
    async with http_server(settings, tmp_path, "--tokens", str(tokens)) as url:
        async with over_http(url, "olga-secret-token") as olga:
            assert (await call(olga, "events", session_id=sid))["events"]  # she may read it
            refused = await olga.call_tool("cancel", {"session_id": sid})
            assert refused.is_error and refused.structured_content is not None
            error = refused.structured_content["error"]
            assert (error["code"], error["exit_code"]) == ("not_permitted", 6), error
            assert f"(observer olga-{settings.prefix})" in error["message"]
        async with over_http(url, "admin-secret-token") as admin:  # the same server, another caller's rights
            assert (await call(admin, "cancel", session_id=sid))["seq"] > 0
        async with httpx2.AsyncClient() as http:
            assert (await http.post(url, json={}, headers={"Authorization": "Bearer wrong"})).status_code == 401
