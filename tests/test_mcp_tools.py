"""Agents use MCP servers as tools: a small server on the `mcp` SDK (tests/fixtures/mcp_test_server.py), over
stdio in the sandbox and over Streamable HTTP; calls and results in the log; a server killed mid-call is an
error result for the model, the session goes on, and the next call starts it again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.mcp.servers import McpServerSpec, parse_option
from agentbus.messages import ToolCallCompleted, ToolCallStarted
from agentbus.testing import text_response, tool_use_response
from services.supervisor.pools import load_pools
from services.supervisor.spawner import agent_args
from tests.helpers import POOL, agent_with_fake, free_port, until

FIXTURE = Path(__file__).parent / "fixtures" / "mcp_test_server.py"
# what the server needs of this host, shown to it read-only in the sandbox: the venv, the interpreter, itself
NEEDS = (sys.prefix, sys.base_prefix, str(FIXTURE.parent))


async def _calls(client: agentbus.Client, sid: str) -> list[tuple[str, str, bool]]:
    started = {
        r.event.tool_use_id: r.event.name for r in await client.show(sid) if isinstance(r.event, ToolCallStarted)
    }
    return [
        (started[r.event.tool_use_id], r.event.output, r.event.is_error)
        for r in await client.show(sid)
        if isinstance(r.event, ToolCallCompleted)
    ]


async def test_a_stdio_server_in_the_sandbox_serves_calls_dies_mid_call_and_is_started_again(
    settings: Settings, client: agentbus.Client, tmp_path: Path
) -> None:
    server = McpServerSpec(name="t", command=(sys.executable, str(FIXTURE)), read_only=NEEDS)
    async with agent_with_fake(settings, tmp_path / "work", mcp=(server,), tool_env=("SECRET_NAME=hush",)) as (
        api,
        worker,
    ):
        await until(lambda: _has(worker.tools, "mcp__t__note"), "the MCP server's tools to be listed", timeout=30)
        assert worker.tools["mcp__t__echo"].repeatable is True  # readOnlyHint: safe to re-run after a crash
        assert getattr(worker.tools["mcp__t__note"], "repeatable", False) is False
        api.script([
            tool_use_response("mcp__t__echo", {"text": "hello"}),
            tool_use_response("mcp__t__die", {}),
            tool_use_response("mcp__t__note", {"text": "after the restart"}),
            text_response("done"),
        ])  # fmt: skip
        sid = await client.submit("use the tools", pool=POOL)
        state = await client.wait(sid, timeout=60)

    assert (state.status, state.result) == ("completed", "done")
    (echo, died, note) = await _calls(client, sid)
    assert echo[0] == "mcp__t__echo" and not echo[2]
    assert "hello" in echo[1] and "SECRET_NAME=hush" in echo[1]  # its environment is the pool's tool_env
    assert int(echo[1].split("pid ")[1].split(":")[0]) < 10  # its own pid namespace: the sandbox
    assert died[0] == "mcp__t__die" and died[2] and "stopped during the call" in died[1]
    assert note == ("mcp__t__note", "noted in /work", False)  # a new process, in its own directory as /work
    assert (tmp_path / "work" / ".mcp" / "t" / "notes.txt").read_text() == "after the restart\n"
    third = api.requests[2][0]["messages"][-1]["content"]
    assert third[0]["is_error"] and "stopped during the call" in str(third[0]["content"])
    assert any(t["name"] == "mcp__t__echo" for t in api.requests[0][0]["tools"])


async def test_an_http_server_is_called_and_once_killed_each_call_is_an_error_result(
    settings: Settings, client: agentbus.Client, tmp_path: Path
) -> None:
    port = free_port()
    with (tmp_path / "http-server.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(FIXTURE), "--http", str(port)], stdout=log, stderr=log)  # noqa: ASYNC220 - polled, never awaited for output
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        await until(lambda: _listening(port, proc), "the test MCP server to listen", timeout=20)
        async with agent_with_fake(settings, tmp_path / "work", mcp=(McpServerSpec(name="web", url=url),)) as (api, w):
            await until(lambda: _has(w.tools, "mcp__web__echo"), "the MCP server's tools to be listed", timeout=30)
            api.script([
                tool_use_response("mcp__web__echo", {"text": "over http"}),
                tool_use_response("mcp__web__die", {}),
                tool_use_response("mcp__web__echo", {"text": "anyone there?"}),
                text_response("carried on"),
            ])  # fmt: skip
            sid = await client.submit("use the web tools", pool=POOL)
            state = await client.wait(sid, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (state.status, state.result) == ("completed", "carried on")
    echo, died, again = await _calls(client, sid)
    assert echo[0] == "mcp__web__echo" and "over http" in echo[1] and not echo[2]
    assert died[2] and again[2] and "MCP server web" in again[1]


async def _has(tools: dict[str, Any], name: str) -> bool:
    return name in tools


async def _listening(port: int, proc: subprocess.Popen[bytes]) -> bool:
    import socket

    assert proc.poll() is None, "the test MCP server exited"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_a_server_that_cannot_start_is_a_log_line_not_a_crash(
    settings: Settings, client: agentbus.Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = McpServerSpec(name="gone", command=("/nonexistent/mcp-server",))
    async with agent_with_fake(settings, tmp_path / "work", mcp=(broken,)) as (api, worker):
        api.script([text_response("fine without it")])
        sid = await client.submit("anything", pool=POOL)
        assert (await client.wait(sid, timeout=30)).status == "completed"
        assert not [name for name in worker.tools if name.startswith("mcp__")]
    assert any("MCP server gone" in r.getMessage() and "cannot start" in r.getMessage() for r in caplog.records)


def test_the_pools_file_names_mcp_servers_and_the_supervisor_passes_them_on(tmp_path: Path) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text(
        '[pools.a]\nmodel = "scripted:demo"\ntool_env = ["TRACKER_TOKEN"]\n'
        '[pools.a.mcp.tracker]\ncommand = ["tracker-mcp", "--stdio"]\nread_only = ["/opt/tracker"]\n'
        '[pools.a.mcp.docs]\nurl = "http://127.0.0.1:9000/mcp"\n'
    )
    spec = load_pools(pools).pools["a"]
    argv = agent_args(spec, Settings())
    passed = [parse_option(a.removeprefix("--mcp=")) for a in argv if a.startswith("--mcp=")]
    assert (
        passed
        == list(spec.mcp)
        == [
            McpServerSpec(name="tracker", command=("tracker-mcp", "--stdio"), read_only=("/opt/tracker",)),
            McpServerSpec(name="docs", url="http://127.0.0.1:9000/mcp"),
        ]
    )
    assert not any("TRACKER_TOKEN=" in a for a in argv)  # a secret is named, never put on the command line
    pools.write_text('[pools.a]\nmodel = "scripted:demo"\n[pools.a.mcp.x]\ncommand = ["a"]\nurl = "http://h/"\n')
    with pytest.raises(UsageError, match="either `command`"):
        load_pools(pools)
