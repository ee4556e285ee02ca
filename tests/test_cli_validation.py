"""Every bad option or file is one line on stderr and exit 2, before anything starts or is written."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from click.testing import CliRunner

from agentbus.cli import main
from agentbus.cli.sessions import STATUSES
from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import Status
from services.supervisor.pools import load_pools

UNREACHABLE = ["--nats", "nats://127.0.0.1:1"]  # a check that let the value through would exit 4 here


def _refused(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("agentbus: "), result.stderr
    return result.stderr


def test_the_status_filter_knows_every_status_and_only_those() -> None:
    assert get_args(Status) == STATUSES


def test_an_unknown_status_filter_lists_the_valid_ones() -> None:
    err = _refused("sessions", "--status", "bogus", *UNREACHABLE)
    assert "unknown status 'bogus'" in err and "queued" in err and "cancelled" in err


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "x", "--pool", "bad pool"],
        ["submit", "x", "--opinion-pool", "ok", "--opinion-pool", "a.b"],
        ["agent", "--pool", "bad pool", "--model", "scripted:demo"],
        ["spend", "--reset", "bad pool"],
    ],
)
def test_a_bad_pool_name_is_a_usage_error_everywhere(args: list[str]) -> None:
    assert "pool name" in _refused(*args, *UNREACHABLE)


@pytest.mark.parametrize("command", ["server", "up"])
@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(command: str, port: str, tmp_path: Path) -> None:
    err = _refused(command, "--port", port, "--store-dir", str(tmp_path / "store"))
    assert "--port" in err
    assert not (tmp_path / "store").exists()  # refused before anything was made


def _pools(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('max_worker = 3\n[pools.a]\nmodel = "m"\n', "unknown key 'max_worker'; did you mean 'max_workers'?"),
        ('[pools.a]\nmodel = "m"\nmn = 1\n', "pool a: unknown key 'mn'; did you mean 'min'?"),
        ('[pools.a]\nmodel = "m"\nmaxx = 2\n', "pool a: unknown key 'maxx'; did you mean 'max'?"),
        (
            '[pools.a]\nmodel = "m"\n[pools.a.budget]\nmax_stpes = 4\n',
            "unknown key 'max_stpes'; did you mean 'max_steps'?",
        ),
        ('[pools.a]\nmodel = "m"\n[pools.a.budget]\nmax_wall = 4\n', "did you mean 'max_wall_s'?"),
        ('[pools.a]\nmodel = "m"\n[pools.a.budget]\nzzz = 4\n', "unknown key 'zzz' (valid: max_steps, "),
        ('[pools.a]\nmodel = "m"\n[pools.a.budget]\nmax_usd = -1.0\n', "max_usd must be a positive number, not -1.0"),
        ('[pools.a]\nmodel = "m"\n[pools.a.budget]\nmax_steps = 0\n', "max_steps must be a positive whole number"),
        ('[pools.a]\nmodel = "m"\nbudget = 3\n', "budget must be a table"),
    ],
)
def test_a_pools_file_with_a_wrong_key_or_limit_names_it_and_the_nearest_valid_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(UsageError) as err:
        load_pools(_pools(tmp_path, text))
    assert message in str(err.value)


def test_a_budget_limit_from_the_environment_is_converted_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIMIT", "2.5")
    text = '[pools.a]\nmodel = "m"\n[pools.a.budget]\nmax_usd = "${LIMIT}"\nmax_steps = "${STEPS:-40}"\n'
    fleet = load_pools(_pools(tmp_path, text))
    assert (fleet.pools["a"].budget.max_usd, fleet.pools["a"].budget.max_steps) == (2.5, 40)


def test_the_supervisor_refuses_a_pools_file_typo_in_one_line(tmp_path: Path) -> None:
    path = _pools(tmp_path, '[pools.a]\nmodel = "m"\nmn = 1\n')
    err = _refused("supervisor", "--pools", str(path), *UNREACHABLE)
    assert "did you mean 'min'?" in err


def test_the_compose_pools_file_loads_with_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENTBUS_MODEL", "AGENTBUS_MAX_USD", "AGENTBUS_CEILING_USD", "AGENTBUS_EXTRA_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    fleet = load_pools(Path(__file__).parents[1] / "compose" / "pools.toml")
    assert fleet.pools["general"].budget.max_usd == 2.0 and fleet.ceiling_usd is None


def test_a_pools_file_entry_makes_its_agents_ask_for_approvals_as_agent_approve_does(tmp_path: Path) -> None:
    from services.agent.cli import command as agent_command
    from services.supervisor.spawner import agent_args

    text = (
        '[pools.a]\nmodel = "scripted:demo"\ntools = ["read_file", "bash"]\napprove = ["bash", "mcp__tracker__close"]\n'
        'approval_timeout_s = 600\non_approval_timeout = "pause"\n'
    )
    argv = agent_args(load_pools(_pools(tmp_path, text)).pools["a"], Settings())
    params = agent_command.make_context("agent", argv[1:]).params  # parsed as the worker will, not run
    assert (params["approve"], params["approval_timeout"], params["on_approval_timeout"]) == (
        ("bash", "mcp__tracker__close"),
        600.0,
        "pause",
    )
    plain = agent_command.make_context(
        "agent", agent_args(load_pools(_pools(tmp_path, '[pools.a]\nmodel = "m"\n')).pools["a"], Settings())[1:]
    ).params
    assert (plain["approve"], plain["approval_timeout"], plain["on_approval_timeout"]) == ((), None, "deny")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('approve = "bash"\ntools = ["bash"]\n', "approve must be a list of tool names"),
        ('approve = ["bsh"]\ntools = ["bash"]\n', "approve names bsh, not among its tools (bash)"),
        ("approval_timeout_s = -5\n", "approval_timeout_s must be a positive number of seconds"),
        ('on_approval_timeout = "wait"\n', "on_approval_timeout must be 'deny' or 'pause'"),
    ],
)
def test_a_wrong_approval_setting_in_a_pools_file_is_named(tmp_path: Path, keys: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        load_pools(_pools(tmp_path, '[pools.a]\nmodel = "m"\n' + keys))
    assert message in str(err.value)
