"""The `agentbus` command as a person uses it: output, --json, and the documented exit codes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentbus.bus import Bus
from agentbus.cli import main
from agentbus.config import Settings
from agentbus.errors import NotAuthenticated, UsageError
from agentbus.server import NatsServer
from tests.helpers import free_port


@pytest.fixture
def cli(nats_server: NatsServer, prefix: str):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
        result = runner.invoke(main, [*args, "--nats", nats_server.url, "--prefix", prefix], input=input)
        return result.exit_code, result.stdout, result.stderr

    return invoke


def test_submit_say_show_and_sessions_work_together_with_json(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("submit", "write a haiku", "--pool", "writers", "--json")
    assert code == 0
    sid = json.loads(out)["session_id"]
    assert cli("say", sid, "make it rhyme", "--as", "alice")[0] == 0
    code, out, _ = cli("show", sid, "--json")
    shown = json.loads(out)
    assert shown["state"]["status"] == "queued"
    assert [e["event"]["type"] for e in shown["events"]] == ["session_created", "routed", "human_message"]
    # the sender is who the credentials say (the server's admin here); --as is only a display name
    assert shown["events"][2]["sender"] == "admin"
    assert shown["events"][2]["event"]["author"] == 'admin (as "alice")'
    code, out, _ = cli("sessions", "--json")
    assert code == 0 and sid in out
    code, out, _ = cli("tap", sid, "--no-follow", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [e["seq"] for e in shown["events"]]


def test_submit_reads_the_prompt_from_standard_input(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("submit", "-", "--json", input="from stdin\n")
    assert code == 0
    code, out, _ = cli("show", json.loads(out)["session_id"], "--json")
    assert json.loads(out)["events"][0]["event"]["task"]["prompt"] == "from stdin\n"


def test_exit_codes_are_the_documented_ones(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("show", "nosuchsession")[0] == 3
    code, _, err = cli("show", "a.b")
    assert code == 2 and "session id" in err
    assert cli("tap")[0] == 2  # neither SESSION nor --all
    code, _, err = cli("submit", "x", "--pool", "p", "--wait", "--timeout", "0.5")
    assert code == 5 and "still running" in err


def test_tapping_an_ended_session_live_says_so_and_returns(cli, nats_server, prefix) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import agentbus
    from agentbus.messages import SessionEnded

    async def ended_session() -> str:
        async with agentbus.connect(nats_server.url, prefix=prefix) as client:
            sid = await client.submit("x", pool="p")
            await client.log.append(sid, SessionEnded(id="ended", status="completed", result="r"))
            return sid

    sid = asyncio.run(ended_session())
    code, out, _ = cli("tap", sid)  # live by default: must not wait for events that will never come
    assert code == 0
    assert "already ended completed" in out
    code, _, err = cli("say", sid, "hello?")
    assert code == 2 and "already ended completed" in err


def test_budget_options_reach_the_session(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("submit", "x", "--pool", "p", "--max-usd", "0.5", "--max-steps", "3", "--json")
    assert code == 0
    code, out, _ = cli("show", json.loads(out)["session_id"], "--json")
    assert json.loads(out)["events"][0]["event"]["task"]["budget"] == {"max_steps": 3, "max_usd": 0.5}


def test_an_unreachable_server_is_one_line_and_exit_code_4() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentbus.cli", "sessions", "--nats", "nats://127.0.0.1:1"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "nats://127.0.0.1:1" in proc.stderr


def test_a_bad_prefix_is_a_usage_error_not_a_traceback(cli) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    result = runner.invoke(main, ["sessions", "--prefix", "Bad-Prefix"])
    assert result.exit_code == 2
    assert "prefix" in result.stderr


def test_a_service_given_a_missing_file_says_so_in_one_line() -> None:
    result = CliRunner().invoke(main, ["router", "--routes", "/nonexistent/routes.toml"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "agentbus: routes file /nonexistent/routes.toml: [Errno 2] No such file or directory: "
        "'/nonexistent/routes.toml'"
    )


async def test_a_service_started_before_its_server_waits_for_it_when_told_to(tmp_path: Path) -> None:
    port = free_port()
    server = NatsServer(port=port, store_dir=tmp_path / "nats", admin="admin")
    # its credentials do not exist yet either: made when the server first starts
    creds = tmp_path / "nats" / "auth" / "admin.creds"
    settings = Settings(nats_url=server.url, prefix="wait", connect_wait_s=30, creds=str(creds))
    with pytest.raises(NotAuthenticated, match="cannot read credentials"):
        await Bus.connect(settings.with_(connect_wait_s=0))  # not told to wait: fails at once
    connecting = asyncio.create_task(Bus.connect(settings))
    await asyncio.sleep(1.5)
    assert not connecting.done(), "still trying while no server listens"
    await asyncio.to_thread(server.start)
    try:
        bus = await asyncio.wait_for(connecting, 30)
        await bus.close()
    finally:
        server.stop()


async def test_a_comma_separated_url_names_several_servers_and_any_live_one_serves(nats_server: NatsServer) -> None:
    dead = free_port()
    for _ in range(4):  # nats-py shuffles the list; the dead one must never matter
        urls = f"nats://127.0.0.1:{dead}, {nats_server.url}"
        bus = await Bus.connect(Settings(nats_url=urls, prefix="multi", creds=str(nats_server.admin_creds)))
        assert bus.connected_url == nats_server.url
        await bus.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "nats://", "nats://a:1,ftp://b"])
async def test_a_malformed_url_fails_at_once_even_when_told_to_wait(url: str) -> None:
    with pytest.raises(UsageError, match="bad NATS URL"):
        await Bus.connect(Settings(nats_url=url, connect_wait_s=600))


def test_steering_verbs_answer_in_one_line_and_refuse_what_nothing_would_read(cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("submit", "x", "--pool", "nobody", "--approve", "bash", "--json")
    sid = json.loads(out)["session_id"]
    code, out, _ = cli("show", sid, "--json")
    assert json.loads(out)["events"][0]["event"]["task"]["approve"] == ["bash"]
    code, out, _ = cli("say", sid, "later, please", "--queue")
    assert code == 0 and out.startswith("queued (#")
    code, out, _ = cli("interrupt", sid, "stop that")
    assert code == 0 and "goes on with your text" in out
    code, _, err = cli("approve", sid)
    assert code == 2 and err == f"agentbus: session {sid} has no tool call waiting for an approval\n"
    code, out, err = cli("inbox", "--json")
    assert code == 0 and out == ""  # a queued session needs nobody
    code, _, err = cli("inbox", "--dismiss", sid)
    assert code == 2 and "not in the inbox" in err
    assert cli("cancel", sid)[0] == 0
    code, _, err = cli("interrupt", sid)
    assert code == 2 and "already ended cancelled" in err
    code, _, err = cli("say", sid, "hello", "--queue")
    assert code == 2 and "already ended cancelled" in err
