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
    sandbox = "bwrap"                       # where bash runs; "none": unconfined (warned at start)
    network = false                         # may sandboxed commands use the network?
    tool_env = ["GITHUB_TOKEN", "LANG=C.UTF-8"]  # their environment: NAME (the agent's value) or NAME=VALUE
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from agentbus.errors import UsageError
from agentbus.messages import Budget
from agentbus.sandbox import tool_environment
from agentbus.subjects import valid_token


@dataclass(frozen=True)
class PoolSpec:
    name: str
    model: str
    tools: tuple[str, ...] = ("read_file", "write_file", "delegate", "ask_human")
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
    sandbox: Literal["bwrap", "none"] = "bwrap"  # where tools that run commands run (README, "Sandbox")
    network: bool = False
    tool_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fleet:
    pools: dict[str, PoolSpec]
    max_workers: int = 16
    ceiling_usd: float | None = None


def load_pools(path: str | Path) -> Fleet:
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"pools file {where}: {err}") from err
    data = _expand(data, where)
    pools = {}
    for name, raw in (data.get("pools") or {}).items():
        if not valid_token(name):
            raise UsageError(f"pools file {where}: pool name {name!r} must be letters, digits, '-' or '_'")
        if "model" not in raw:
            raise UsageError(f"pools file {where}, pool {name}: `model` is required")
        try:
            # strict=False: a limit written as "${AGENTBUS_MAX_USD:-2.0}" arrives as a string
            budget = msgspec.convert(raw.get("budget", {}), Budget, strict=False)
        except msgspec.ValidationError as err:
            raise UsageError(f"pools file {where}, pool {name}, budget: {err}") from err
        here = f"pools file {where}, pool {name}"
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
                budget=budget,
                env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
                ceiling_usd=_dollars(raw.get("ceiling_usd"), here),
                sandbox=raw.get("sandbox", "bwrap"),
                network=_flag(raw.get("network", False), f"{here}: network"),
                tool_env=tuple(str(e) for e in raw.get("tool_env", ())),
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


def _flag(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return raw.lower() in ("true", "1", "yes")
    raise UsageError(f"{where} must be true or false, not {raw!r}")


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
