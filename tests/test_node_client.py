"""A client in another language: tests/node/client.mjs, on the official NATS JavaScript client, written only
against subjects.md and schemas/, taps, submits, steers and lists against a real server and a real agent.

Skipped, saying why, where Node.js or the installed modules are absent (`make install` runs `npm ci` in
tests/node when npm exists); CI sets AGENTBUS_REQUIRE_NODE=1, which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.messages import HumanMessage, InvalidEvent, MessageDelivered
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from tests.conftest import AsUser
from tests.helpers import POOL, Gate, agent, until

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")


def _missing() -> str | None:
    if NODE is None:
        return "Node.js is not installed (apt install nodejs npm), so there is no foreign client to run"
    if not (NODE_DIR / "node_modules" / "@nats-io" / "transport-node").is_dir():
        return "the Node client's modules are not installed: run `npm ci` in tests/node (make install does)"
    return None


@pytest.fixture(autouse=True)
def _node() -> None:
    """Skip, saying why, where Node.js or the modules are absent; fail instead where CI requires them."""
    why = _missing()
    if why and os.environ.get("AGENTBUS_REQUIRE_NODE") == "1":
        pytest.fail(why)
    if why:
        pytest.skip(why)


async def test_a_node_client_taps_submits_steers_and_lists_from_the_documents_alone(
    client: agentbus.Client, settings: Settings, as_user: AsUser, tmp_path: Path
) -> None:
    gate = Gate()

    def respond(body: dict[str, Any]) -> dict[str, Any]:
        said = json.dumps(body["messages"])
        if "from node" not in said:
            return text_response("written in python")
        if "make it rhyme" in said:
            return text_response("queues in a line, rhyming fine")
        gate.hold()  # the first call of the node session waits until node's message is in the log
        return tool_use_response("read_file", {"path": "notes.txt"}, id="tu_1")

    node_user = as_user("node", "operator")
    with FakeMessagesAPI(responder=respond) as api:
        async with agent(settings, api, tmp_path, gates=(gate,)):
            earlier = await client.submit("a session from python", pool=POOL)
            assert (await client.wait(earlier, timeout=30)).status == "completed"
            proc = await asyncio.create_subprocess_exec(
                str(NODE), str(NODE_DIR / "client.mjs"),
                cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "AGENTBUS_NATS_URL": settings.nats_url, "AGENTBUS_CREDS": str(node_user.creds),
                     "AGENTBUS_POOL": POOL, "AGENTBUS_PROMPT": "a haiku, from node", "AGENTBUS_SAY": "make it rhyme",
                     "AGENTBUS_TAP": earlier},
            )  # fmt: skip
            try:
                lines = await _run(proc, client, gate)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    summary = lines[-1]["summary"]
    sid = summary["session_id"]
    assert summary["tapped"][0] == "session_created" and summary["tapped"][-1] == "session_ended"
    assert summary["tapped_result"] == "written in python"
    assert summary["invalid"] == 0, [line for line in lines if "invalid" in line and "summary" not in line]
    assert (summary["status"], summary["result"]) == ("completed", "queues in a line, rhyming fine")
    assert summary["delivered"] == 2 and summary["sender"] == summary["user"] == f"node-{settings.prefix}"
    assert summary["sessions"] == sorted([earlier, sid]) and summary["sessions"][0] == earlier
    # what the agentbus side saw: the node session and its message, nothing it could not read
    records = await client.show(sid)
    said = [r for r in records if isinstance(r.event, HumanMessage)]
    assert [(r.seq, r.sender, r.event.text) for r in said] == [(summary["said"], summary["user"], "make it rhyme")]
    assert any(isinstance(r.event, MessageDelivered) and r.event.message_seq == summary["said"] for r in records)
    assert not any(isinstance(r.event, InvalidEvent) for r in records)
    assert (await client.state(sid)).status == "completed"
    if "state" in summary:  # the cache, if the agent had refreshed it by then: valid and borne out by the log
        assert summary["state"]["valid"] and summary["state"]["trusted"]


async def _run(proc: asyncio.subprocess.Process, client: agentbus.Client, gate: Gate) -> list[dict[str, Any]]:
    """Read node's lines; open the gate once its message is in its session's log; return every line."""
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[dict[str, Any]] = []
    openers: list[asyncio.Task[None]] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = json.loads(raw)
            lines.append(line)
            if "submitted" in line:
                openers.append(asyncio.create_task(_open_when_said(client, line["submitted"], gate)))

    try:
        await asyncio.wait_for(read(), timeout=90)
    finally:
        for opener in openers:
            opener.cancel()
        await asyncio.gather(*openers, return_exceptions=True)
    err = (await proc.stderr.read()).decode()
    assert await proc.wait() == 0, err
    assert lines and "summary" in lines[-1], err
    return lines


async def _open_when_said(client: agentbus.Client, sid: str, gate: Gate) -> None:
    async def said() -> bool:
        return any(isinstance(r.event, HumanMessage) for r in await client.show(sid))

    await until(said, "node's message in its session", timeout=60)
    gate.open()
