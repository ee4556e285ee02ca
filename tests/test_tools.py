"""Agent tools: confined to the session workspace, failures are results, plug-ins load by entry point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import services.agent.tools as tools_mod
from agentbus.config import DEFAULT_TOOLS
from agentbus.errors import UsageError
from agentbus.sandbox import Bubblewrap
from services.agent.tools import Bash, ReadFile, ToolContext, ToolError, WriteFile, load_tools


def _ctx(tmp_path: Path) -> ToolContext:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ToolContext(session_id="s1", workspace=ws, step=1, tool_use_id="tu1", sandbox=Bubblewrap())


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/passwd", "a/../../outside.txt"])
async def test_paths_that_escape_the_workspace_are_refused(tmp_path: Path, path: str) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(ToolError, match="outside the session workspace"):
        await WriteFile().run({"path": path, "content": "x"}, ctx)
    with pytest.raises(ToolError, match="outside the session workspace"):
        await ReadFile().run({"path": path}, ctx)
    assert not (tmp_path / "outside.txt").exists()


async def test_a_symlink_out_of_the_workspace_is_refused(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", ctx.workspace / "link.txt")
    with pytest.raises(ToolError, match="symbolic link"):
        await ReadFile().run({"path": "link.txt"}, ctx)


async def test_write_then_read_round_trips_inside_the_workspace(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    await WriteFile().run({"path": "sub/dir/f.txt", "content": "héllo"}, ctx)
    assert await ReadFile().run({"path": "sub/dir/f.txt"}, ctx) == "héllo"
    assert (ctx.workspace / "sub/dir/f.txt").read_text() == "héllo"


async def test_bash_runs_in_the_workspace_and_reports_a_failing_exit_code(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    (ctx.workspace / "here.txt").write_text("x")
    assert (await Bash().run({"command": "pwd; ls"}, ctx)).split() == ["/work", "here.txt"]
    with pytest.raises(ToolError, match="exit code 3"):
        await Bash().run({"command": "echo oops; exit 3"}, ctx)


async def test_bash_stops_a_command_at_its_timeout(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="timed out"):
        await Bash().run({"command": "sleep 30", "timeout": 0.2}, _ctx(tmp_path))


async def test_bash_output_is_capped(tmp_path: Path) -> None:
    out = await Bash().run({"command": "head -c 100000 /dev/zero | tr '\\\\0' x"}, _ctx(tmp_path))
    assert len(out) < 17_000
    assert "more characters cut" in out


def test_bash_is_off_unless_asked_for() -> None:
    assert "bash" not in DEFAULT_TOOLS
    assert "bash" not in load_tools(DEFAULT_TOOLS)


def test_the_default_tools_run_no_command() -> None:
    """A container pool with the default tools needs no sandbox inside the container: the docker
    spawner's list of tools that run no command holds every default one."""
    from services.supervisor import docker_spawner

    assert set(DEFAULT_TOOLS) <= docker_spawner._NO_COMMANDS


def test_an_unknown_tool_name_is_a_usage_error_naming_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown tool 'nope'.*read_file"):
        load_tools(["nope"])


class _Echo:
    name = "echo"
    description = "Echo the input."
    input_schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

    async def run(self, input: dict[str, object], ctx: ToolContext) -> str:
        return str(input["text"])


class _EntryPoint:
    name = "echo"

    def load(self) -> type[_Echo]:
        return _Echo


async def test_a_plugin_tool_loads_from_the_entry_point_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[str] = []

    def fake_entry_points(*, group: str) -> list[_EntryPoint]:
        seen.append(group)
        return [_EntryPoint()]

    monkeypatch.setattr(tools_mod, "entry_points", fake_entry_points)
    loaded = load_tools(["read_file", "echo"])
    assert seen == ["agentbus.tools"]
    assert await loaded["echo"].run({"text": "hi"}, _ctx(tmp_path)) == "hi"


async def test_bash_commands_do_not_see_api_keys_or_bus_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    monkeypatch.setenv("AGENTBUS_NATS_URL", "nats://127.0.0.1:4222")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret")
    out = await Bash().run({"command": "env; cat /proc/*/environ; true"}, _ctx(tmp_path))
    assert "sk-secret" not in out and "ghp-secret" not in out and "AGENTBUS_NATS_URL" not in out
    assert "PATH=" in out
