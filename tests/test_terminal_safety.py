"""What agents and models write is shown, never obeyed: control characters reach no terminal."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

import agentbus
from agentbus import render
from agentbus.cli import main
from agentbus.messages import HumanMessage, SessionEnded, StatusChanged, WorkerInfo, encode
from agentbus.server import NatsServer

HOSTILE = "title\x1b]0;pwned\x07 red\x1b[31m over\rwrite \x9b2J bidi\u202etxt.exe bell\x07 del\x7f"
CONTROLS = [chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))] + ["\u202e"]


def _safe(text: str) -> bool:
    return not any(c in text for c in CONTROLS)


def test_clean_shows_every_control_character_as_an_escape() -> None:
    shown = render.clean(HOSTILE)
    assert _safe(shown)
    assert "\\x1b]0;pwned\\x07" in shown and "\\x0d" in shown and "\\x9b" in shown and "\\u202e" in shown
    assert render.clean("two\nlines\tand a tab") == "two\nlines\tand a tab"
    assert render.clean("two\nlines", newlines=False) == "two lines"


@pytest.fixture
async def hostile_session(client: agentbus.Client) -> str:
    sid = await client.submit(HOSTILE, pool="p")
    await client.log.append(sid, HumanMessage(id="say-x", text=HOSTILE, author=HOSTILE), channel="input")
    await client.log.append(sid, StatusChanged(id="st", status="running", reason=HOSTILE))
    await client.log.append(sid, SessionEnded(id="ended", status="failed", reason=HOSTILE, result=HOSTILE))
    info = WorkerInfo(worker_id="w\x1b[2J", pool="p", host=HOSTILE, sessions=(HOSTILE,), heartbeat_ts=time.time())
    await client.bus.kv_put(client.bus.ns.workers_bucket, "w1", encode(info))
    return sid


@pytest.mark.parametrize(
    "command",
    [["show", "{sid}"], ["tap", "{sid}", "--no-follow"], ["tap", "--all", "--no-follow"], ["tap", "{sid}"],
     ["sessions"], ["agents"]],
)  # fmt: skip
def test_show_tap_sessions_and_agents_print_no_control_character(
    hostile_session: str, nats_server: NatsServer, prefix: str, command: list[str]
) -> None:
    args = [a.format(sid=hostile_session) for a in command]
    result = CliRunner().invoke(main, [*args, "--nats", nats_server.url, "--prefix", prefix])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert _safe(result.stdout), result.stdout
    assert "\\x1b" in result.stdout
    if command[0] != "show":  # show prints the result as written, newlines and all; the rest, one line each
        assert all(line.count("\\x1b") >= 1 for line in result.stdout.splitlines() if "title" in line)
