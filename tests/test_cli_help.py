"""`agentbus --help` and `--version`: fast (nothing heavy imported), complete, and true to the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import click
import pytest
from click.testing import CliRunner

from agentbus import budget, errors
from agentbus.cli import ENTRY_POINTS, EXIT_CODES, SERVICES, main
from agentbus.messages import Budget

HEAVY = ("anthropic", "services", "opentelemetry.sdk", "docker", "nats", "msgspec", "agentbus.client", "asyncio")


def test_top_level_help_imports_no_service_sdk_bus_or_wire_types() -> None:
    script = (
        "import sys\n"
        "from agentbus.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('\\n' + __import__('json').dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    assert "Services" in proc.stdout and "supervisor" in proc.stdout


def test_every_service_is_an_entry_point_and_every_entry_point_is_listed() -> None:
    declared = {ep.name for ep in entry_points(group=ENTRY_POINTS)}
    assert declared == set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_service_line_in_the_help_is_its_commands_own_docstring(name: str) -> None:
    (ep,) = entry_points(group=ENTRY_POINTS, name=name)
    command = ep.load()
    assert isinstance(command, click.Command) and command.help
    assert " ".join(command.help.split("\n\n")[0].split()) == SERVICES[name]


def test_a_service_runs_through_its_entry_point() -> None:
    result = CliRunner().invoke(main, ["router", "--help"])
    assert result.exit_code == 0
    assert "--routes" in result.stdout


def test_help_lists_every_command_and_every_exit_code() -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in main.list_commands(click.Context(main)):
        assert f"\n  {name} " in result.stdout, name
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, Exception)}
    assert codes <= set(EXIT_CODES)
    for code, what in EXIT_CODES.items():
        assert f"{code} " in result.stdout and what.split(":")[0] in result.stdout


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("agentbus, version ")


def test_shell_completion_script_is_generated_for_bash() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agentbus.cli"],
        env={**os.environ, "_AGENTBUS_COMPLETE": "bash_source"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "complete " in proc.stdout and "_AGENTBUS_COMPLETE" in proc.stdout


@pytest.mark.parametrize("command", [["submit", "x"], ["resume", "s1"], ["agent", "--pool", "p", "--model", "m"]])
@pytest.mark.parametrize("limit", budget.LIMITS, ids=lambda limit: limit.name)
@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_budget_limit_of_zero_or_less_is_one_line_and_exit_2(
    command: list[str], limit: budget.Limit, value: str
) -> None:
    result = CliRunner().invoke(main, [*command, limit.flag, value, "--nats", "nats://127.0.0.1:1"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"agentbus: Invalid value for '{limit.flag}': must be a positive")


def test_a_budget_limit_of_the_wrong_kind_is_refused() -> None:
    result = CliRunner().invoke(main, ["submit", "x", "--max-steps", "2.5"])
    assert result.exit_code == 2
    assert "--max-steps" in result.stderr


def test_the_supervisors_argv_for_a_budget_parses_back_to_the_same_budget() -> None:
    (ep,) = entry_points(group=ENTRY_POINTS, name="agent")
    agent = ep.load()
    given = Budget(max_steps=40, max_tool_calls=7, max_tokens=100_000, max_usd=2.5, max_wall_s=90.0)
    ctx = agent.make_context("agent", ["--pool", "p", "--model", "m", *budget.to_argv(given)])
    parsed = Budget(**{limit.field: ctx.params[f"budget_{limit.field}"] for limit in budget.LIMITS})
    assert parsed == given
    assert budget.to_argv(Budget(max_usd=1.0)) == ["--max-usd", "1.0"]
