"""`agentbus server` and `up`: one server per store, a busy port said plainly, nothing outlives them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbus.server import LOCK_FILE, NatsServer
from tests.helpers import free_port

CLI = [sys.executable, "-m", "agentbus.cli"]


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )  # fmt: skip


def _one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("agentbus: "), stderr
    return stderr


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _descendants(root: int) -> set[int]:
    """Every live process below `root`, from the parent pids in /proc."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(proc.name)] = int(proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= frontier
    return {pid for pid in found if _alive(pid)}


@contextlib.contextmanager
def _started(*args: str, cwd: Path, ready: str = "ready") -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """An `agentbus` subprocess, after it printed a line containing `ready`; killed if still running."""
    proc = subprocess.Popen(
        [*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"},
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while not any(ready in line for line in lines):
            line = proc.stdout.readline()
            assert line, "exited before it was ready:\n" + "".join(lines)
            lines.append(line)
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_second_server_on_a_held_store_exits_4_naming_the_holder_and_starts_nothing(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "store"):
        proc = _run("server", "--port", "0", "--store-dir", "store", cwd=tmp_path)
        assert proc.returncode == 4
        err = _one_line(proc.stderr)
        assert f"store directory store is in use by agentbus pid {os.getpid()}" in err
        assert "nats-server pid" in err


def test_a_busy_port_exits_4_naming_the_port_and_its_holder_before_touching_any_store(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for command in ("server", "up"):
            proc = _run(command, "--port", str(port), "--store-dir", "store", cwd=tmp_path)
            assert proc.returncode == 4, proc.stderr
            err = _one_line(proc.stderr)
            assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in err
            assert not (tmp_path / "store").exists()


def test_the_port_of_a_running_nats_server_names_it(tmp_path: Path, nats_server: NatsServer) -> None:
    proc = _run("server", "--port", str(nats_server.port), "--store-dir", "store", cwd=tmp_path)
    assert proc.returncode == 4
    assert "(nats-server)" in _one_line(proc.stderr)


def test_nats_server_dies_with_a_kill_9_of_agentbus_server_and_its_store_is_free_again(tmp_path: Path) -> None:
    with _started("server", "--port", "0", "--store-dir", "store", cwd=tmp_path) as (proc, _):
        lock = (tmp_path / "store" / LOCK_FILE).read_text()
        nats_pid = int(re.search(r"nats-server pid (\d+)", lock).group(1))  # type: ignore[union-attr]
        assert _alive(nats_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _until_gone(nats_pid, 10), "nats-server outlived the agentbus server that started it"
    with _started("server", "--port", "0", "--store-dir", "store", cwd=tmp_path) as (again, lines):
        assert "nats-server ready" in lines[-1]
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (None, "pools file missing.toml: [Errno 2] No such file or directory"),
        ('[pools.general]\nmodel = "scripted:demo"\nmn = 1\n', "unknown key 'mn'; did you mean 'min'?"),
        ('[pools.general]\nmodel = "scripted:nosuch.json"\n', "model 'scripted:nosuch.json': cannot read"),
    ],
)
def test_up_checks_its_pools_file_before_starting_anything(tmp_path: Path, pools: str | None, message: str) -> None:
    if pools is not None:
        (tmp_path / "missing.toml").write_text(pools)
    port = free_port()
    proc = _run("up", "--pools", "missing.toml", "--port", str(port), "--store-dir", "store", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in _one_line(proc.stderr)
    assert "ready" not in proc.stdout
    assert not (tmp_path / "store").exists()


@pytest.mark.timeout(150)
def test_a_kill_9_of_up_takes_nats_and_every_service_with_it_and_up_leaves_no_temp_dir(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with _started("up", "--port", "0", "--store-dir", str(store), cwd=tmp_path, ready="Ctrl-C stops") as (proc, _):
        nats_pid = int(re.search(r"nats-server pid (\d+)", (store / LOCK_FILE).read_text()).group(1))  # type: ignore[union-attr]
        family = _descendants(proc.pid)
        assert nats_pid in family and len(family) >= 4  # nats, router, evaluator, supervisor (and its agents)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            assert _until_gone(nats_pid, 10), "nats-server outlived agentbus up"
            for pid in family:  # the services drain (the supervisor its agents), then exit
                assert _until_gone(pid, 90), f"pid {pid} outlived agentbus up"
        finally:
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    if _alive(pid):
                        os.kill(pid, signal.SIGKILL)


def test_up_removes_its_scratch_directory_when_it_stops(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.Popen(
        [*CLI, "up", "--port", "0", "--store-dir", str(tmp_path / "store")],
        cwd=tmp_path, env={**env, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops" in line:
                break
        assert next(p.name for p in tmp.iterdir()).startswith("agentbus-up-")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert list(tmp.iterdir()) == []


def test_the_web_view_moves_off_a_taken_default_port_and_a_port_asked_for_must_be_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another `agentbus up` (or anything) on the default port: `up` takes a free one, whether NATS's
    port is named or 0 (as in tests run beside a person's own `up`); a port named by hand is refused."""
    from agentbus import up
    from agentbus.errors import AgentBusError

    with socket.socket() as default, socket.socket() as named:
        for held in (default, named):
            held.bind(("127.0.0.1", 0))
            held.listen()
        monkeypatch.setattr(up, "WEB_PORT", default.getsockname()[1])
        for nats_port in (0, 4222):
            assert up.web_port_for(up.WEB_PORT, nats_port) not in (up.WEB_PORT, 0)
        with pytest.raises(AgentBusError, match=str(named.getsockname()[1])):
            up.web_port_for(named.getsockname()[1], 4222)
