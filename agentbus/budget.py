"""Session budgets: the five limits in one table, how they combine, and how they are checked.

Everything that names the limits reads `LIMITS`: the CLI options (`options`), the pools file
(`from_mapping`), the agent's check before every model call (`over_budget`), what a child
session inherits (`remaining`) and the command line a supervisor gives its workers (`to_argv`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from agentbus.errors import UsageError

if TYPE_CHECKING:
    from agentbus.messages import Budget, Record
    from agentbus.state import SessionState

__all__ = [
    "LIMITS",
    "Limit",
    "Stop",
    "effective_budget",
    "from_mapping",
    "merge",
    "options",
    "over_budget",
    "remaining",
    "to_argv",
]


@dataclass(frozen=True)
class Limit:
    """One budget limit.

    Attributes:
        name: how the session log (`budget_exceeded`) and the CLI (`--max-wall`) name it.
        field: the `Budget` field on the wire.
        kind: int or float.
        unit: what the figures in a pause's detail count.
        help: what the limit counts, for `--help`.
    """

    name: str
    field: str
    kind: type[int] | type[float]
    unit: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


LIMITS: tuple[Limit, ...] = (
    Limit("max_steps", "max_steps", int, "model calls", "model turns"),
    Limit("max_tool_calls", "max_tool_calls", int, "tool calls", "tool calls"),
    Limit("max_tokens", "max_tokens", int, "tokens (input + cache write + cache read + output)",
          "tokens (input + cache write + cache read + output)"),
    Limit("max_usd", "max_usd", float, "USD", "dollars"),
    Limit("max_wall", "max_wall_s", float, "seconds", "wall time in seconds since submission"),
)  # fmt: skip
_BY_FIELD = {limit.field: limit for limit in LIMITS}


@dataclass(frozen=True)
class Stop:
    """Why a session must pause before its next model call."""

    limit: str  # a Limit's name, or no_progress, pool_ceiling_usd, ...
    detail: str


# --- checking a value ---------------------------------------------------------------------------


def check(limit: Limit, raw: Any) -> int | float:
    """`raw` as the limit's type; a limit must be a positive, finite number (UsageError otherwise)."""
    what = "whole number" if limit.kind is int else "number"
    try:
        if isinstance(raw, bool) or (limit.kind is int and isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        value = limit.kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{limit.name} must be a positive {what}, not {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{limit.name} must be a positive {what}, not {raw!r}")
    return value


def from_mapping(raw: Mapping[str, object], where: str) -> Budget:
    """A budget from a table of wire fields (the pools file's `[pools.X.budget]`), every key and value checked."""
    from agentbus.messages import Budget

    values: dict[str, Any] = {}
    for key, value in raw.items():
        limit = _BY_FIELD.get(key)
        if limit is None:
            raise UsageError(f"{where}: unknown key {key!r}{suggest(key, _BY_FIELD)}")
        if value == "":  # "${VAR:-}" with VAR unset: no limit, as for ceiling_usd
            continue
        try:
            values[key] = check(limit, value)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
    return Budget(**values)


def suggest(key: str, known: Sequence[str] | Mapping[str, object]) -> str:
    """`; did you mean 'max'?` for the nearest known key, and the valid keys when none is near."""
    names = sorted(known)
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(names)})"


# --- combining and checking against a session ---------------------------------------------------


def merge(*budgets: Budget) -> Budget:
    """Later budgets override earlier ones field by field (None leaves the earlier limit)."""
    from agentbus.messages import Budget

    out: dict[str, Any] = {}
    for b in budgets:
        out.update({limit.field: v for limit in LIMITS if (v := getattr(b, limit.field)) is not None})
    return Budget(**out)


def effective_budget(pool_default: Budget, records: Sequence[Record]) -> Budget:
    """Pool defaults, then the session's own budget, then every `resume` raise, in log order."""
    from agentbus.messages import ResumeRequested, SessionCreated

    layers = [pool_default]
    for rec in records:
        if isinstance(rec.event, SessionCreated):
            layers.append(rec.event.task.budget)
        elif isinstance(rec.event, ResumeRequested):
            layers.append(rec.event.budget)
    return merge(*layers)


def _used(state: SessionState, now: float) -> dict[str, float]:
    """What the session has used, per Budget field."""
    return {
        "max_steps": state.steps,
        "max_tool_calls": state.tool_calls,
        "max_tokens": state.usage.total,
        "max_usd": state.cost_usd,
        "max_wall_s": now - state.created_ts if state.created_ts else 0.0,
    }


def over_budget(budget: Budget, state: SessionState, now: float) -> Stop | None:
    """The first limit the session has reached, with the figures."""
    used = _used(state, now)
    for limit in LIMITS:
        cap = getattr(budget, limit.field)
        if cap is not None and used[limit.field] >= cap:
            return Stop(limit.name, f"{_fmt(used[limit.field])} of {_fmt(cap)} {limit.unit}")
    return None


def remaining(budget: Budget, state: SessionState, now: float) -> Budget:
    """What is left of a budget: a child session inherits this, not the whole."""
    from agentbus.messages import Budget

    used = _used(state, now)
    left: dict[str, Any] = {}
    for limit in LIMITS:
        cap = getattr(budget, limit.field)
        if cap is not None:
            left[limit.field] = limit.kind(max(cap - used[limit.field], 0))
    return Budget(**left)


def to_argv(budget: Budget) -> list[str]:
    """The limits that are set, as `agentbus agent` options (`--max-usd 2.0 ...`)."""
    argv: list[str] = []
    for limit in LIMITS:
        value = getattr(budget, limit.field)
        if value is not None:
            argv += [limit.flag, str(value)]
    return argv


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


# --- command-line options -----------------------------------------------------------------------


def _positive(limit: Limit) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: the option, when given, must be a positive number (else a usage error, exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(limit, value)
        except UsageError:
            what = "whole number" if limit.kind is int else "number"
            raise click.BadParameter(f"must be a positive {what}, not {value!r}", ctx, param) from None

    return callback


def options(lead: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The five limits as options (`--max-steps`, ..., `--max-wall`), handed to the command as one `budget`."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from agentbus.messages import Budget

            limits = {limit.field: kwargs.pop(f"budget_{limit.field}") for limit in LIMITS}
            return f(*args, budget=Budget(**limits), **kwargs)

        decorated: Callable[..., Any] = wrapper
        for limit in reversed(LIMITS):
            decorated = click.option(
                limit.flag,
                f"budget_{limit.field}",
                type=limit.kind,
                callback=_positive(limit),
                help=f"{lead}: {limit.help}.",
            )(decorated)
        return decorated

    return decorate
