"""Routing policy: a pure function from a task to a pool, so decisions can be replayed and diffed.

A routes file (TOML):

    default_pool = "general"

    [[route]]
    name = "code"             # recorded in the routed event
    tags = ["code", "bug"]    # matches if the task has any of these tags
    pool = "coder"
    model = "anthropic:claude-sonnet-4-6"   # optional: the model this pool should use

    [[route]]
    name = "reviews"
    match = "(?i)\\breview\\b"  # or a regular expression searched in the prompt
    pool = "reviewers"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from agentbus.errors import UsageError
from agentbus.messages import Task
from agentbus.subjects import valid_token

DEFAULT_POOL = "general"


@dataclass(frozen=True)
class Route:
    name: str
    pool: str
    tags: frozenset[str] = frozenset()
    pattern: re.Pattern[str] | None = None
    model: str | None = None

    def matches(self, task: Task) -> bool:
        if self.tags and self.tags.intersection(task.tags):
            return True
        return bool(self.pattern and self.pattern.search(task.prompt))


@dataclass(frozen=True)
class Decision:
    pool: str
    rule: str
    model: str | None = None


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...] = ()
    default_pool: str = DEFAULT_POOL
    models: dict[str, str] = field(default_factory=dict)  # pool -> model named by any route

    def choose(self, task: Task) -> Decision:
        """The explicit pool, else the first matching rule, else the default pool."""
        if task.pool:
            return Decision(task.pool, "explicit", self.models.get(task.pool))
        for route in self.routes:
            if route.matches(task):
                return Decision(route.pool, route.name, route.model)
        return Decision(self.default_pool, "default", self.models.get(self.default_pool))


def load_routes(path: str | Path | None, *, default_pool: str = DEFAULT_POOL) -> RouteTable:
    """Parse a routes file; every mistake is a `UsageError` naming the file and the rule."""
    if path is None:
        return RouteTable(default_pool=default_pool)
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"routes file {where}: {err}") from err
    default = str(data.get("default_pool", default_pool))
    _check_pool(default, where, "default_pool")
    routes = []
    for i, raw in enumerate(data.get("route", [])):
        name = str(raw.get("name") or f"route-{i + 1}")
        pool = str(raw.get("pool", ""))
        _check_pool(pool, where, name)
        pattern = None
        if "match" in raw:
            try:
                pattern = re.compile(str(raw["match"]))
            except re.error as err:
                raise UsageError(f"routes file {where}, rule {name}: bad regular expression: {err}") from err
        tags = frozenset(str(t) for t in raw.get("tags", []))
        if not tags and pattern is None:
            raise UsageError(f"routes file {where}, rule {name}: give `tags` or `match`")
        routes.append(Route(name, pool, tags, pattern, raw.get("model")))
    models = {r.pool: r.model for r in reversed(routes) if r.model}
    return RouteTable(tuple(routes), default, models)


def _check_pool(pool: str, where: str, rule: str) -> None:
    if not valid_token(pool):
        raise UsageError(f"routes file {where}, {rule}: pool {pool!r} must be letters, digits, '-' or '_'")
