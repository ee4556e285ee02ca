"""The pools file (TOML): which pools exist, their model, tools, size, spawner and default budget.

    [pools.coder]
    model = "anthropic:claude-sonnet-4-6"   # or "scripted:path.json"
    tools = ["read_file", "write_file", "bash", "delegate"]
    min = 1
    max = 4
    spawner = "process"                     # or "docker"
    image = "agentbus:latest"               # docker only
    volumes = ["agentbus-work:/work"]       # docker only: keep workspaces across containers
    pull = false                            # docker only: let the engine pull a missing image
    concurrency = 4
    idle_s = 30                             # scale down after this long with an empty queue
    ack_wait_s = 60                         # a dead worker's task moves on after this long
    ceiling_usd = 50.0                      # the whole pool's spend; over it, sessions pause
    models = ["anthropic:claude-haiku-4-5"] # what `submit --model` may choose besides `model`
    sandbox = "bwrap"                       # where bash runs; "none": unconfined (warned at start)
    network = false                         # may sandboxed commands use the network?
    tool_env = ["GITHUB_TOKEN", "LANG=C.UTF-8"]  # their environment: NAME (the agent's value) or NAME=VALUE
    [pools.coder.mcp.tracker]               # an MCP server whose tools the agents offer (mcp__tracker__...)
    command = ["tracker-mcp"]               # stdio, in the sandbox with tool_env; or url = "http://..."
    repo = "/srv/repos/backend"             # each session in its own worktree and branch agentbus/<session>
    base = "main"                           # where branches start (default: the checked-out branch)
    review = true                           # ended sessions wait in the inbox as "ready for review"
    approve = ["bash"]                      # tools whose calls wait for a person's approval
    approval_timeout_s = 600                # how long one may wait (default: forever)
    on_approval_timeout = "deny"            # or "pause": the session waits in the inbox
    [pools.coder.budget]
    max_steps = 40
    max_usd = 2.0
    [pools.coder.env]
    SOME_VAR = "value"

A top-level `max_workers` caps the whole fleet (default 16) and a top-level `ceiling_usd`
its spend (all pools together; `agentbus spend` shows it and `--reset` starts a new count). Strings may name environment
variables as `${NAME}` or `${NAME:-default}`, so one file serves several deployments
(`model = "${AGENTBUS_MODEL:-scripted:demo}"`).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from agentbus import budget
from agentbus.config import DEFAULT_TOOLS
from agentbus.errors import UsageError
from agentbus.mcp.servers import McpServerSpec
from agentbus.mcp.servers import from_mapping as mcp_server
from agentbus.messages import Budget
from agentbus.sandbox import tool_environment
from agentbus.subjects import valid_token


@dataclass(frozen=True)
class PoolSpec:
    name: str
    model: str
    tools: tuple[str, ...] = DEFAULT_TOOLS
    min: int = 1
    max: int = 4
    spawner: Literal["process", "docker"] = "process"
    image: str = "agentbus:latest"
    volumes: tuple[str, ...] = ()
    pull: bool = False  # docker only: let the engine pull a missing image
    concurrency: int = 4
    idle_s: float = 30.0
    ack_wait_s: float = 60.0  # how soon a dead worker's task goes to another agent
    budget: Budget = Budget()  # noqa: RUF009 - frozen
    env: dict[str, str] = field(default_factory=dict)
    ceiling_usd: float | None = None
    models: tuple[str, ...] = ()  # models a submitter may choose besides `model` (the agents' --allow-model)
    sandbox: Literal["bwrap", "none"] = "bwrap"  # where tools that run commands run (README, "Sandbox")
    network: bool = False
    tool_env: tuple[str, ...] = ()
    mcp: tuple[McpServerSpec, ...] = ()  # [pools.X.mcp.NAME] (issue 17)
    repo: str = ""  # a git repository the pool's sessions work on (README, "Repositories")
    base: str = ""
    review: bool = False
    approve: tuple[str, ...] = ()  # tools whose calls wait for a person (README, "People in the loop")
    approval_timeout_s: float | None = None
    on_approval_timeout: Literal["deny", "pause"] = "deny"


@dataclass(frozen=True)
class Fleet:
    pools: dict[str, PoolSpec]
    max_workers: int = 16
    ceiling_usd: float | None = None


# Every key the file may hold, by level; anything else is a typo, named with the nearest valid key.
TOP_KEYS = ("pools", "max_workers", "ceiling_usd")
POOL_KEYS = tuple(f.name for f in fields(PoolSpec) if f.name != "name")


def _known(table: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in keys:
            raise UsageError(f"{where}: unknown key {key!r}{budget.suggest(key, keys)}")


def _table(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where} must be a table, not {raw!r}")
    return raw


def load_pools(path: str | Path) -> Fleet:
    """The fleet a pools file describes; anything wrong in it is one UsageError naming the place."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"pools file {where}: {err}") from err
    data = _expand(data, where)
    _known(data, TOP_KEYS, f"pools file {where}")
    pools = {}
    for name, raw in _table(data.get("pools") or {}, f"pools file {where}: [pools]").items():
        if not valid_token(name):
            raise UsageError(f"pools file {where}: pool name {name!r} must be letters, digits, '-' or '_'")
        here = f"pools file {where}, pool {name}"
        raw = _table(raw, f"{here}: [pools.{name}]")
        _known(raw, POOL_KEYS, here)
        if "model" not in raw:
            raise UsageError(f"{here}: `model` is required")
        # a limit written as "${AGENTBUS_MAX_USD:-2.0}" arrives as a string: from_mapping converts it
        limits = budget.from_mapping(_table(raw.get("budget", {}), f"{here}: budget"), f"{here}, budget")
        try:
            spec = PoolSpec(
                name=name,
                model=str(raw["model"]),
                tools=tuple(raw.get("tools", PoolSpec.tools)),
                min=int(raw.get("min", 1)),
                max=int(raw.get("max", 4)),
                spawner=raw.get("spawner", "process"),
                image=str(raw.get("image", "agentbus:latest")),
                volumes=tuple(str(v) for v in raw.get("volumes", ())),
                pull=_flag(raw.get("pull", False), f"{here}: pull"),
                concurrency=int(raw.get("concurrency", 4)),
                idle_s=float(raw.get("idle_s", 30)),
                ack_wait_s=float(raw.get("ack_wait_s", 60)),
                budget=limits,
                env={str(k): str(v) for k, v in _table(raw.get("env") or {}, f"{here}: env").items()},
                ceiling_usd=_dollars(raw.get("ceiling_usd"), here),
                models=tuple(str(m) for m in raw.get("models", ())),
                sandbox=raw.get("sandbox", "bwrap"),
                network=_flag(raw.get("network", False), f"{here}: network"),
                tool_env=tuple(str(e) for e in raw.get("tool_env", ())),
                mcp=tuple(
                    mcp_server(str(n), _table(t, f"{here}: mcp.{n}"), here)
                    for n, t in _table(raw.get("mcp") or {}, f"{here}: mcp").items()
                ),
                repo=str(raw.get("repo", "")),
                base=str(raw.get("base", "")),
                review=_flag(raw.get("review", False), f"{here}: review"),
                approve=_names(raw.get("approve", ()), f"{here}: approve"),
                approval_timeout_s=_seconds(raw.get("approval_timeout_s"), f"{here}: approval_timeout_s"),
                on_approval_timeout=raw.get("on_approval_timeout", "deny"),
            )
        except (TypeError, ValueError) as err:  # "max = 'two'", or a ${VAR} that is not a number
            raise UsageError(f"{here}: {err}") from err
        # max = 0 is a pool this supervisor never adds to (compose's agents serve it alone)
        if not 0 <= spec.min <= spec.max:
            raise UsageError(f"{here}: need 0 <= min <= max")
        if spec.spawner not in ("process", "docker"):
            raise UsageError(f"pools file {where}, pool {name}: spawner must be 'process' or 'docker'")
        if spec.sandbox not in ("bwrap", "none"):
            raise UsageError(f"{here}: sandbox must be 'bwrap' or 'none'")
        if spec.on_approval_timeout not in ("deny", "pause"):
            raise UsageError(f"{here}: on_approval_timeout must be 'deny' or 'pause'")
        # an MCP server's tools (mcp__<server>__<tool>) are known only once the agent lists them
        unknown = [t for t in spec.approve if t not in spec.tools and not t.startswith("mcp__")]
        if unknown:
            raise UsageError(
                f"{here}: approve names {', '.join(unknown)}, not among its tools ({', '.join(spec.tools)})"
            )
        if spec.base and not spec.repo:
            raise UsageError(f"{here}: base needs repo (a base is a ref of the pool's repository)")
        try:
            tool_environment(spec.tool_env, {})  # names only: values are the agent's business
        except UsageError as err:
            raise UsageError(f"{here}: {err}") from None
        pools[name] = spec
    if not pools:
        raise UsageError(f"pools file {where}: no [pools.NAME] table")
    try:
        max_workers = int(data.get("max_workers", 16))
    except (TypeError, ValueError) as err:
        raise UsageError(f"pools file {where}: max_workers: {err}") from err
    return Fleet(pools, max_workers, _dollars(data.get("ceiling_usd"), f"pools file {where}"))


def check_models(fleet: Fleet) -> None:
    """Each pool's model can be made: a scripted model's file loads, an anthropic model has a key
    (in the environment or the pool's `env`). Raises UsageError naming the pool."""
    from agentbus.models import ScriptedModel

    for spec in fleet.pools.values():
        scheme, _, rest = spec.model.partition(":")
        here = f"pool {spec.name}, model {spec.model!r}"
        if scheme == "scripted" and rest:
            try:
                ScriptedModel(rest)
            except UsageError as err:
                raise UsageError(f"{here}: {err}") from None
        elif scheme == "anthropic" and rest:
            env = {**os.environ, **spec.env}
            if not (env.get("ANTHROPIC_API_KEY") or env.get("ANTHROPIC_AUTH_TOKEN")):
                raise UsageError(f"{here} needs ANTHROPIC_API_KEY (or a scripted:FILE model to run offline)")
        else:
            raise UsageError(f"{here}: expected anthropic:<model-id> or scripted:<file>")


def check_repos(fleet: Fleet) -> None:
    """Each pool's repository is one (at the path every worker sees), with its base, and a clean main
    checkout. Raises UsageError naming the pool."""
    from agentbus.repo import open_for_pool

    for spec in fleet.pools.values():
        if spec.repo:
            try:
                open_for_pool(spec.repo, spec.base or None)
            except UsageError as err:
                raise UsageError(f"pool {spec.name}: {err}") from None


def _flag(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return raw.lower() in ("true", "1", "yes")
    raise UsageError(f"{where} must be true or false, not {raw!r}")


def _names(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, str) or not isinstance(raw, list | tuple) or not all(isinstance(n, str) and n for n in raw):
        raise UsageError(f"{where} must be a list of tool names, not {raw!r}")
    return tuple(raw)


def _seconds(raw: Any, where: str) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{where} must be a number of seconds, not {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{where} must be a positive number of seconds, not {raw!r}")
    return value


def _dollars(raw: Any, where: str) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: ceiling_usd must be a number of dollars, not {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{where}: ceiling_usd must be a finite number of dollars, not {raw!r}")
    return value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    """`${NAME}` and `${NAME:-default}` in every string of the file, as compose and the shell do."""
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if default is not None and not found:  # as compose and the shell: ":-" covers unset and empty
            found = default
        if found is None:
            raise UsageError(f"pools file {where}: ${{{name}}} is not set (write ${{{name}:-default}} for a default)")
        return found

    return _VAR.sub(sub, value)
