"""What commands share, and what service commands import: options, settings, running, JSON out.

Only click and small pure modules are imported here: `agentbus --help` loads this file, so the
client, the bus and the wire types are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agentbus import budget
from agentbus.subjects import valid_token

if TYPE_CHECKING:
    from agentbus.client import Client
    from agentbus.config import Settings

__all__ = [
    "PORT",
    "budget_options",
    "emit_json",
    "nats_option",
    "pool_name",
    "run",
    "settings_from",
    "with_client",
]

T = TypeVar("T")

budget_options = budget.options
"""The five budget limits as options, handed to the command as one `budget: Budget`."""

PORT = click.IntRange(0, 65535)
"""A TCP port (0: any free one); anything else is a usage error."""


def _creds_to_env(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # read by Settings.from_env, and inherited by the processes this one starts
        os.environ["AGENTBUS_CREDS"] = value


def nats_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--nats URL`, `--creds FILE` and `--prefix`, on every command that talks to the bus."""
    f = click.option(
        "--creds",
        metavar="FILE",
        expose_value=False,
        callback=_creds_to_env,
        help="Credentials file [env AGENTBUS_CREDS; default: those of a server this user started here].",
    )(f)
    f = click.option(
        "--prefix",
        envvar="AGENTBUS_PREFIX",
        default="agentbus",
        show_default=True,
        help="Namespace of subjects and streams (several deployments can share one server).",
    )(f)
    return click.option(
        "--nats",
        "nats_url",
        default=None,
        metavar="URL",
        help="NATS server [env AGENTBUS_NATS_URL, then NATS_URL; default nats://127.0.0.1:4222].",
    )(f)


def pool_name(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback: every pool name given (one, or a tuple for a repeatable option) must be a
    valid subject token, or the command stops with a usage error before it does anything."""
    names = value if isinstance(value, tuple) else (value,)
    for name in names:
        if name is not None and not valid_token(name):
            raise click.BadParameter(
                f"pool name {name!r} must be 1-64 characters of letters, digits, '-' or '_'", ctx, param
            )
    return value


def settings_from(nats_url: str | None, prefix: str) -> Settings:
    """Settings from options and environment; a bad value is a usage error (exit 2), not a traceback."""
    from agentbus.config import Settings, nats_url_from_env
    from agentbus.subjects import Namespace

    try:
        settings = Settings.from_env(nats_url=nats_url or nats_url_from_env(), prefix=prefix)
        Namespace(settings.prefix)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    return settings


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to the end. Errors and Ctrl-C go to the command group, which turns them
    into one line and the documented exit code."""
    import asyncio  # here: ~25 ms that `agentbus --help` does not need

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def with_client(settings: Settings, body: Callable[[Client], Awaitable[T]]) -> T:
    """Run `body` with a connected client (closed afterwards, whatever happens)."""
    from agentbus.client import connect

    async def main() -> T:
        async with connect(settings=settings, name="agentbus-cli") as client:
            return await body(client)

    return run(main)


def emit_json(obj: Any) -> None:
    """One JSON object on one line of standard output."""
    click.echo(json.dumps(obj, ensure_ascii=False))
