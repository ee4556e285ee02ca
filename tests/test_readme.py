"""README paths, run as written: the Python example, the three terminals by hand, a crash and a resume.

The only liberty taken: a free port instead of 4222 (given with --port and AGENTBUS_NATS_URL),
and a temporary directory as the working directory, so a test never meets another's server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import agentbus
from agentbus.messages import ModelResponded, SessionClaimed, SessionEnded, ToolCallStarted
from tests.helpers import free_port, until

README = (Path(__file__).parents[1] / "README.md").read_text()
BIN = str(Path(sys.executable).parent)  # where `agentbus` is, as `. .venv/bin/activate` would put it


def _block(after: str, lang: str) -> str:
    """The first fenced block of `lang` after the heading `after`."""
    section = README.split(after, 1)[1]
    found = re.search(rf"```{lang}\n(.*?)```", section, re.DOTALL)
    assert found, f"README has a {lang} block after {after!r}"
    return found.group(1)


def _env(url: str) -> dict[str, str]:
    # a newcomer's shell: no API key, and no credentials (the suite's own server sets AGENTBUS_CREDS);
    # the server the README starts leaves its admin's for this user's commands to find
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "AGENTBUS_CREDS")}
    return {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "AGENTBUS_NATS_URL": url}


@contextlib.contextmanager
def _background(cmd: str, cwd: Path, env: dict[str, str], ready: str) -> Iterator[subprocess.Popen[str]]:
    """A terminal of its own: `cmd` in a shell until it prints `ready`; Ctrl-C'd (then killed) after."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        while not any(ready in line for line in seen):
            line = proc.stdout.readline()
            assert line, f"{cmd} exited before {ready!r}:\n" + "".join(seen)
            seen.append(line)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def _up(tmp_path: Path) -> Iterator[str]:
    """`agentbus up` on a free port, as the README's Python example and walk-through expect."""
    port = free_port()
    env = _env(f"nats://127.0.0.1:{port}")
    with _background(f"agentbus up --port {port}", tmp_path, env, "Ctrl-C stops everything"):
        yield env["AGENTBUS_NATS_URL"]


def _commands(block: str) -> list[str]:
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.timeout(120)
def test_the_readme_python_example_runs_as_written_against_agentbus_up(tmp_path: Path) -> None:
    example = tmp_path / "example.py"
    example.write_text(_block("## Scripts: the Python API", "python"))
    with _up(tmp_path) as url:
        proc = subprocess.run(
            [sys.executable, str(example)], env=_env(url), cwd=tmp_path, capture_output=True, text=True,
            timeout=90, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.endswith(" human_message") for line in lines)  # the say, in the tap
    assert any(line.endswith(" session_ended") for line in lines)
    assert lines[-3:] == ["tasks wait in a line", "an agent wakes, takes the next", "the log keeps the time"]


@pytest.mark.timeout(120)
def test_the_by_hand_commands_work_in_the_order_written(tmp_path: Path) -> None:
    activate, server, agent, *terminal_3 = _commands(_block("## By hand, in three terminals", "sh"))
    assert activate == ". .venv/bin/activate" and server == "agentbus server" and agent.startswith("agentbus agent")
    assert terminal_3[-1].startswith("agentbus show")
    port = free_port()
    env = _env(f"nats://127.0.0.1:{port}")
    with (
        _background(f"{server} --port {port}", tmp_path, env, "nats-server ready"),
        _background(agent, tmp_path, env, "serving pool general"),
    ):
        script = "set -euo pipefail\n" + "\n".join(terminal_3) + "\n"
        proc = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "said (#" in out  # the say came before the end, so it was taken
    assert re.search(r"human_message\s+\S+ \(as \"alice\"\): make it rhyme", out)  # the sender, and the name it gave
    assert re.search(r"session_ended\s+completed", out)
    assert "-- completed" in out  # show
    assert re.search(r"\n\S+\s+completed\s+general ", out)  # sessions
    assert re.search(r"\ngeneral\s+1 ", out)  # pools: the agent of terminal 2


@pytest.mark.timeout(150)
async def test_the_crash_walk_through_a_kill_9_mid_step_and_another_agent_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTBUS_CREDS", raising=False)  # as a newcomer: `up` leaves its admin's for us
    walk = _commands(_block("### Watch a crash and a resume", "sh"))
    assert walk[0] == "agentbus up" and "--pool slow" in walk[1] and walk[-1] == "kill -9 PID"
    with _up(tmp_path) as url:
        async with agentbus.connect(url) as client:
            sid = await client.submit("write a haiku about queues", pool="slow")

            async def mid_step() -> bool:
                return any(isinstance(r.event, ModelResponded) for r in await client.show(sid))

            await until(mid_step, "the first step of the slow session", timeout=60)
            (victim,) = [w for w in await client.workers() if w.pool == "slow" and sid in w.sessions]
            os.kill(victim.pid, signal.SIGKILL)
            state = await client.wait(sid, timeout=100)
            records = await client.show(sid)
    assert state.status == "completed"
    claims = [r.event for r in records if isinstance(r.event, SessionClaimed)]
    assert claims[-1].attempt >= 2 and claims[-1].worker != victim.worker_id
    steps = [r.event.step for r in records if isinstance(r.event, ModelResponded)]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5]  # no recorded model call made twice
    started = [r.event.tool_use_id for r in records if isinstance(r.event, ToolCallStarted) and not r.event.rerun]
    assert len(started) == len(set(started))
    assert isinstance(records[-1].event, SessionEnded)
