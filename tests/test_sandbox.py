"""The sandbox, against the findings of issue 14: real bwrap, real processes, each escape tried and refused.

The hostile model is a fake Messages API asking a real `agentbus agent` process for bash
commands; the library tests call `Bubblewrap.run` directly where a limit or a process's
life is the point.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import ToolCallCompleted
from agentbus.sandbox import Bubblewrap, Limits, Policy, SandboxUnavailable, tool_environment
from agentbus.server import NatsServer
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.agent.tools import Bash, ToolContext, ToolError
from tests.helpers import until

SECRET = "sk-ant-sandbox-" + secrets.token_hex(8)
POOL = "p"


def _token() -> str:
    """A number no other process has on its command line: `sleep 1000.<token>` names this test's processes."""
    return f"{secrets.randbelow(10**9)}"


def _with(token: str) -> list[int]:
    """Pids whose command line holds `token`; every shell of a call holds its whole command."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


async def _none_left(token: str) -> bool:
    return not _with(token)


@pytest.fixture
def sandbox() -> Bubblewrap:
    box = Bubblewrap()
    box.probe()
    return box


def _ctx(workspace: Path, sandbox: Bubblewrap, **kw: Any) -> ToolContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return ToolContext(session_id=workspace.name, workspace=workspace, step=1, tool_use_id="tu", sandbox=sandbox, **kw)


# --- what a command can see ---------------------------------------------------------------------------


async def test_bash_cannot_read_another_workspace_root_or_the_home_or_a_file_holding_the_key(
    tmp_path: Path, sandbox: Bubblewrap
) -> None:
    root = tmp_path / "work"
    (root / "other").mkdir(parents=True)
    (root / "other" / "notes.txt").write_text("OTHER-SESSION-DATA")
    keyfile = tmp_path / "home" / ".env"
    keyfile.parent.mkdir()
    keyfile.write_text(f"ANTHROPIC_API_KEY={SECRET}\n")
    ctx = _ctx(root / "mine", sandbox)
    command = (
        f"cat ../other/notes.txt {root}/other/notes.txt {keyfile}; ls /root /home {tmp_path}; "
        f"cat /proc/{os.getpid()}/environ; echo ROOT $(ls /)"
    )
    out = await Bash().run({"command": command}, ctx)
    assert "OTHER-SESSION-DATA" not in out and SECRET not in out
    assert out.count("No such file or directory") >= 6, out
    root_dir = out.split("ROOT ")[1].split()
    assert root_dir == ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "work"], "all there is"


async def test_a_commands_environment_holds_only_the_allow_list(
    tmp_path: Path, sandbox: Bubblewrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("INNOCENT_LOOKING", "hidden")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.example")
    tool_env = tool_environment(["PIP_INDEX_URL", "MODE=ci", "UNSET_HERE"], os.environ)
    out = await Bash().run({"command": "env"}, _ctx(tmp_path / "ws", sandbox, tool_env=tool_env))
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                   "PWD": "/work", "PIP_INDEX_URL": "https://pypi.example", "MODE": "ci"}  # fmt: skip


def test_the_allow_list_refuses_the_bus_the_model_key_and_tracing() -> None:
    for name in ("ANTHROPIC_API_KEY", "AGENTBUS_NATS_URL", "NATS_URL", "OTEL_EXPORTER_OTLP_HEADERS", "nats_creds"):
        with pytest.raises(UsageError, match="never reach a tool"):
            tool_environment([name], {name: "x"})
    with pytest.raises(UsageError, match="NAME or NAME=VALUE"):
        tool_environment(["A B=1"], {})


async def test_without_the_network_a_command_cannot_reach_the_bus_and_with_it_can(
    tmp_path: Path, sandbox: Bubblewrap, nats_server: NatsServer
) -> None:
    port = int(nats_server.url.rsplit(":", 1)[1])
    connect = (
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); print('connected')\""
    )
    closed = await sandbox.run(connect, tmp_path, Policy())
    assert closed.exit_code != 0 and b"ConnectionRefusedError" in closed.output, closed.output
    opened = await sandbox.run(connect, tmp_path, Policy(network=True))
    assert (opened.exit_code, opened.output) == (0, b"connected\n")


# --- no process outlives its call ---------------------------------------------------------------------


async def test_a_background_process_is_gone_when_the_call_returns(tmp_path: Path, sandbox: Bubblewrap) -> None:
    token = _token()
    command = (
        f"sleep 1000.{token} & "
        f"(while [ ! -e go ]; do sleep 0.05; done; echo late > marker) > /dev/null 2>&1 & "
        "echo started"
    )
    outcome = await sandbox.run(command, tmp_path, Policy())
    assert (outcome.exit_code, outcome.output) == (0, b"started\n")
    assert _with(token) == [], "every process of the call ended with it"
    (tmp_path / "go").touch()
    assert not (tmp_path / "marker").exists()


_HOLDER = """
import asyncio, sys
from pathlib import Path
from agentbus.sandbox import Bubblewrap, Limits, Policy
asyncio.run(Bubblewrap().run(sys.argv[2], Path(sys.argv[1]), Policy(limits=Limits(timeout_s=300))))
"""


@pytest.mark.timeout(60)
async def test_a_sigkilled_caller_takes_every_process_of_its_call_with_it(tmp_path: Path) -> None:
    token = _token()
    command = (
        f"(while [ ! -e go ]; do sleep 0.05; done; echo late > marker; : {token}) > /dev/null 2>&1 & "
        f"echo up > started; sleep 1000.{token}"
    )
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), command])  # noqa: ASYNC220
    try:
        await until(lambda: asyncio.to_thread((tmp_path / "started").exists), "the command to start", timeout=30)
        assert len(_with(token)) >= 2, "the sleep and the waiting shell run"
        holder.send_signal(signal.SIGKILL)
        await asyncio.to_thread(holder.wait, 10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    await until(lambda: _none_left(token), "the call's processes to die with their caller", timeout=20)
    (tmp_path / "go").touch()
    assert not (tmp_path / "marker").exists(), "no orphan finished the side effect"


# --- limits -------------------------------------------------------------------------------------------


async def test_a_fork_bomb_is_contained_and_reported_as_an_error(tmp_path: Path, sandbox: Bubblewrap) -> None:
    token = _token()
    with pytest.raises(ToolError, match=r"exit code 2\n(.|\n)*Cannot fork") as err:
        await Bash().run({"command": f"while :; do sleep 1000.{token} & done"}, _ctx(tmp_path / "ws", sandbox))
    assert len(str(err.value)) < 20_000
    assert _with(token) == []
    counted = await sandbox.run(
        f"n=0; while sleep 1000.{token} & do n=$((n+1)); echo $n > count; done",
        tmp_path,
        Policy(limits=Limits(processes=64)),
    )
    assert counted.exit_code == 2
    assert 50 < int((tmp_path / "count").read_text()) < 64, "at most the limit, counting the shells"


async def test_the_process_limit_counts_each_call_alone(tmp_path: Path, sandbox: Bubblewrap) -> None:
    """Two calls with 40 processes each run at once under a limit of 64: the count is per call (its own
    user namespace), not per uid, so one busy session cannot starve another."""
    token = _token()

    def holding(me: str, other: str) -> str:
        return (
            f"for i in $(seq 40); do sleep 1000.{token} & done; touch {me}; "
            f"i=0; while [ ! -e {other} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; test -e {other}"
        )

    policy = Policy(limits=Limits(processes=64, timeout_s=60))
    a, b = await asyncio.gather(
        sandbox.run(holding("a", "b"), tmp_path, policy), sandbox.run(holding("b", "a"), tmp_path, policy)
    )
    assert (a.exit_code, b.exit_code) == (0, 0), (a.output, b.output)
    assert _with(token) == []


async def test_a_memory_hog_is_stopped_and_reported(tmp_path: Path, sandbox: Bubblewrap) -> None:
    hog = await sandbox.run("tail /dev/zero", tmp_path, Policy(limits=Limits(memory_bytes=256 << 20)))
    assert hog.exit_code == 1 and b"memory exhausted" in hog.output
    with pytest.raises(ToolError, match="MemoryError"):
        await Bash().run({"command": "python3 -c 'b = bytearray(16 << 30)'"}, _ctx(tmp_path / "ws", sandbox))


async def test_cpu_time_file_size_and_wall_clock_are_limited(tmp_path: Path, sandbox: Bubblewrap) -> None:
    spin = await sandbox.run("while :; do :; done", tmp_path, Policy(limits=Limits(cpu_s=1)))
    assert spin.exit_code == 128 + signal.SIGXCPU and spin.why() == " (killed by the CPU time limit)"
    big = await sandbox.run("head -c 2M /dev/zero > big", tmp_path, Policy(limits=Limits(file_bytes=1 << 20)))
    assert big.exit_code == 128 + signal.SIGXFSZ and "file size limit" in big.why()
    assert (tmp_path / "big").stat().st_size == 1 << 20
    token = _token()
    slow = await sandbox.run(f"sleep 1000.{token}", tmp_path, Policy(limits=Limits(timeout_s=0.5)))
    assert slow.timed_out and slow.exit_code is None
    assert _with(token) == []


async def test_output_is_capped_while_reading(tmp_path: Path, sandbox: Bubblewrap) -> None:
    stopped = await sandbox.run("yes", tmp_path, Policy(limits=Limits(output_bytes=1000)))
    assert stopped.cut and len(stopped.output) == 1000 and stopped.exit_code is None
    drain = Policy(limits=Limits(output_bytes=1000), overflow="drain")
    drained = await sandbox.run("head -c 5000000 /dev/zero; echo done > end", tmp_path, drain)
    assert drained.cut and len(drained.output) == 1000 and drained.exit_code == 0
    assert (tmp_path / "end").read_text() == "done\n", "a drained command runs to its end"


async def test_the_command_never_runs_as_host_root_and_writes_files_the_agent_can_use(
    tmp_path: Path, sandbox: Bubblewrap
) -> None:
    (tmp_path / "from-agent.txt").write_text("agent wrote this\n")
    out = await sandbox.run(
        "id -u; cat from-agent.txt; echo more >> from-agent.txt; echo new > made.txt; touch /usr/x", tmp_path, Policy()
    )
    lines = out.output.decode().splitlines()
    assert lines[:2] == ["1000", "agent wrote this"]
    assert "Read-only file system" in lines[2]
    assert (tmp_path / "made.txt").read_text() == "new\n"
    assert (tmp_path / "from-agent.txt").read_text() == "agent wrote this\nmore\n"
    assert (tmp_path / "made.txt").stat().st_uid != 0, "not host root"


# --- where the sandbox cannot run --------------------------------------------------------------------


def test_a_missing_bwrap_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTBUS_BWRAP", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap not found \(/nonexistent\)"):
        Bubblewrap().probe()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _agent_cmd(settings: Settings, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agentbus.cli", "agent", "--pool", POOL, "--model", "anthropic:claude-sonnet-4-6",
            "--nats", settings.nats_url, "--prefix", settings.prefix, "--workdir", str(workdir), *extra]  # fmt: skip


def test_an_agent_offering_bash_refuses_to_start_without_the_sandbox_in_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**os.environ, "AGENTBUS_BWRAP": "/nonexistent", "ANTHROPIC_API_KEY": "test"}
    done = subprocess.run(
        _agent_cmd(settings, tmp_path, "--tools", "read_file,bash"), env=env, capture_output=True, timeout=60
    )
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1, lines
    assert "the bash tool cannot run: bubblewrap not found (/nonexistent)" in lines[0]
    assert 'sandbox = "none"' in lines[0]
    evaluator = [sys.executable, "-m", "agentbus.cli", "evaluator", "--nats", settings.nats_url]
    refused = subprocess.run(evaluator, env=env, capture_output=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.decode().strip().splitlines() == [
        "agentbus: the evaluator's checks cannot run: bubblewrap not found (/nonexistent); install the bubblewrap "
        'package; or set sandbox = "none" (--sandbox none) to run commands unconfined'
    ]


@pytest.mark.timeout(60)
async def test_an_agent_with_sandbox_none_starts_with_a_warning(
    settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "agent.log"
    env = {**os.environ, "AGENTBUS_BWRAP": "/nonexistent", "ANTHROPIC_API_KEY": "test"}
    with out.open("ab") as f:
        cmd = _agent_cmd(settings, tmp_path, "--tools", "bash", "--sandbox", "none")
        procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))  # noqa: ASYNC220

    async def serving() -> bool:
        return "serving pool" in out.read_text()

    await until(serving, "the agent to serve its pool", timeout=30)
    procs[0].send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(procs[0].wait, 30) == 0
    warnings = [line for line in out.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "the bash tool run UNCONFINED" in warnings[0]


async def test_an_agent_without_command_tools_needs_no_sandbox(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentbus.bus import Bus
    from services.agent.worker import AgentConfig, AgentWorker

    monkeypatch.setenv("AGENTBUS_BWRAP", "/nonexistent")
    bus = await Bus.connect(settings)
    try:
        worker = AgentWorker(bus, AgentConfig(pool=POOL, model="scripted:demo", workdir=tmp_path))
        assert worker.sandbox is None
        with pytest.raises(SandboxUnavailable, match="the bash tool cannot run"):
            AgentWorker(bus, AgentConfig(pool=POOL, model="scripted:demo", workdir=tmp_path, tools=("bash",)))
    finally:
        await bus.close()


# --- a hostile model against a real agent process ----------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_hostile_model_with_bash_finds_no_key_no_bus_url_no_other_session_and_no_network(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    port = settings.nats_url.rsplit(":", 1)[1]
    root = tmp_path / "work"
    (root / "victim").mkdir(parents=True)
    (root / "victim" / "notes.txt").write_text("VICTIM-DATA")
    probe = (
        "echo PPID=$PPID; cat /proc/$PPID/environ /proc/$PPID/cmdline; cat /proc/*/environ; "
        "tr '\\0' ' ' < /proc/1/cmdline; echo; env; cat ../victim/notes.txt; ls ..; "
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)\" 2>&1 | tail -1; "
        "true"
    )

    def responder(request: dict[str, Any]) -> dict[str, Any]:
        if any(m["role"] == "assistant" for m in request["messages"]):
            return text_response("done")
        return tool_use_response("bash", {"command": probe}, id="tu_probe")

    with FakeMessagesAPI(responder=responder) as api:
        env = {**os.environ, "ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": SECRET}
        with (tmp_path / "agent.log").open("ab") as f:
            cmd = _agent_cmd(settings, root, "--tools", "bash")
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))  # noqa: ASYNC220
        sid = await client.submit("look around", pool=POOL)
        state = await client.wait(sid, timeout=60)
    assert state.status == "completed", state.reason
    [result] = [r.event for r in await client.show(sid) if isinstance(r.event, ToolCallCompleted)]
    seen = result.output
    assert SECRET not in seen, "the API key"
    assert settings.nats_url not in seen, "the bus URL (the agent's --nats)"
    assert "VICTIM-DATA" not in seen and "../victim/notes.txt: No such file or directory" in seen
    assert "ConnectionRefusedError" in seen, "no route to the bus"
    assert "PPID=1\n" in seen, "the parent is the sandbox's own init; the agent is not in its process tree"


async def test_the_unconfined_sandbox_still_clears_the_environment_and_kills_its_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentbus.sandbox import Unconfined

    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    token = _token()
    out = await Unconfined().run(f"sleep 1000.{token} > /dev/null & env; pwd", tmp_path, Policy(env={"A": "1"}))
    assert out.exit_code == 0 and SECRET.encode() not in out.output
    assert f"PWD={tmp_path}".encode() in out.output and b"A=1" in out.output
    await until(lambda: _none_left(token), "the process group to be killed", timeout=10)
