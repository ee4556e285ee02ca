"""The `agentbus` command: wiring only, from options to the client API and the services.

Exit codes: 0 ok, 2 usage, 3 no such session, 4 cannot reach NATS, 5 a waited-for
session ended without success (or the wait timed out), 6 not permitted (the role does not allow
it, or the credentials were refused), 1 anything else.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import click

from agentbus import render
from agentbus.auth_cli import auth as auth_group
from agentbus.client import Client, connect
from agentbus.config import Settings, nats_url_from_env
from agentbus.errors import AgentBusError
from agentbus.messages import Budget, SessionEnded, to_builtins

T = TypeVar("T")

SERVICES = {
    "agent": "services.agent.cli",
    "router": "services.router.cli",
    "evaluator": "services.evaluator.cli",
    "supervisor": "services.supervisor.cli",
}


class _Group(click.Group):
    """Loads a service's command only when it is run, so `agentbus tap` never imports the SDKs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *SERVICES])

    def invoke(self, ctx: click.Context) -> Any:
        # One place turns every agentbus error into one line and its exit code, including
        # errors raised while a command reads its files, before any coroutine runs.
        try:
            return super().invoke(ctx)
        except AgentBusError as err:
            click.echo(f"agentbus: {err}", err=True)
            ctx.exit(err.exit_code)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SERVICES:
            cmd = importlib.import_module(SERVICES[name]).command
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, name)


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


_BUDGET_FIELDS = (
    ("--max-steps", "max_steps", int, "model turns"),
    ("--max-tool-calls", "max_tool_calls", int, "tool calls"),
    ("--max-tokens", "max_tokens", int, "tokens (input + cache write + cache read + output)"),
    ("--max-usd", "max_usd", float, "dollars"),
    ("--max-wall", "max_wall_s", float, "wall time in seconds since submission"),
)


def budget_options(lead: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The five budget limits as options, handed to the command as one `budget: Budget`."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            limits = {name: kwargs.pop(f"budget_{name}") for _, name, _, _ in _BUDGET_FIELDS}
            return f(*args, budget=Budget(**limits), **kwargs)

        decorated: Callable[..., Any] = wrapper
        for flag, name, kind, what in reversed(_BUDGET_FIELDS):
            decorated = click.option(flag, f"budget_{name}", type=kind, help=f"{lead}: {what}.")(decorated)
        return decorated

    return decorate


def settings_from(nats_url: str | None, prefix: str) -> Settings:
    """Settings from options and environment; a bad value is a usage error (exit 2), not a traceback."""
    from agentbus.subjects import Namespace

    try:
        settings = Settings.from_env(nats_url=nats_url or nats_url_from_env(), prefix=prefix)
        Namespace(settings.prefix)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    return settings


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine; turn agentbus errors into one line on stderr and their exit code."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except AgentBusError as err:
        click.echo(f"agentbus: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def with_client(settings: Settings, body: Callable[[Client], Awaitable[T]]) -> T:
    async def main() -> T:
        async with connect(settings=settings, name="agentbus-cli") as client:
            return await body(client)

    return run(main)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentbus-runtime")
@click.pass_context
def main(ctx: click.Context) -> None:
    """agentbus: teams of Claude agents on NATS JetStream; a session is a durable stream."""
    from agentbus import tracing

    name = ctx.invoked_subcommand if ctx.invoked_subcommand in SERVICES else "cli"
    ctx.call_on_close(tracing.setup(f"agentbus-{name}"))


# --- server ----------------------------------------------------------------------------------------


@main.command()
@click.option("--port", default=4222, show_default=True, help="Client port on 127.0.0.1 (0: any free port).")
@click.option("--store-dir", default=".agentbus/nats", show_default=True, help="JetStream file store.")
@click.option("--sync-always", is_flag=True, help="fsync every write (survives power loss; slower).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="TLS certificate: clients use tls://.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="The certificate's private key.")
@click.option("--tls-ca", default="", help="CA bundle for this user's CLI to check the certificate with.")
def server(
    port: int, store_dir: str, sync_always: bool, tls_cert: str | None, tls_key: str | None, tls_ca: str
) -> None:
    """Run the embedded nats-server with JetStream until Ctrl-C or SIGTERM (users: `agentbus auth`)."""
    from agentbus.auth import write_context
    from agentbus.server import NatsServer

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    srv = NatsServer(port=port, store_dir=store_dir, sync_always=sync_always, tls_cert=tls_cert, tls_key=tls_key)
    try:
        srv.start()
    except AgentBusError as err:
        click.echo(f"agentbus: {err}", err=True)
        sys.exit(1)
    click.echo(f"nats-server ready on {srv.url} (JetStream store: {srv.store_dir}); Ctrl-C stops it")
    if srv.admin_creds is not None:
        where = write_context(srv.url, srv.admin_creds, tls_ca) if port else None
        found = "your agentbus commands use them for this server" if where else f"AGENTBUS_CREDS={srv.admin_creds}"
        click.echo(f"admin credentials: {srv.admin_creds} ({found}); others: agentbus auth add NAME --role ROLE")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if srv.proc is not None and srv.proc.poll() is not None:
            click.echo(f"agentbus: nats-server exited ({srv.proc.returncode}); see {srv.log_path}", err=True)
            sys.exit(1)
    srv.stop()
    click.echo("nats-server stopped")


# --- submit ----------------------------------------------------------------------------------------


@main.command()
@click.argument("prompt")
@click.option("--pool", help="Pool to run it on (default: let the router choose).")
@click.option("--criterion", "criteria", multiple=True, help="A criterion the evaluator grades (repeatable).")
@click.option("--check", "checks", multiple=True, help="A command that must exit 0 in the workspace (repeatable).")
@click.option("--max-rounds", default=3, show_default=True, help="Evaluation rounds before giving up.")
@budget_options("Budget")
@click.option("--tag", "tags", multiple=True, help="Routing tag (repeatable).")
@click.option("--model", help="Model spec for this session, if the pool allows overrides.")
@click.option("--opinions", type=int, default=0, help="Fan-out: run the task in N sibling sessions (on --pool).")
@click.option("--opinion-pool", "opinion_pools", multiple=True, help="Fan-out: one sibling per pool (repeatable).")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the session ends; exit 5 unless it completed.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds (exit 5).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@nats_option
def submit(
    prompt: str,
    pool: str | None,
    criteria: tuple[str, ...],
    checks: tuple[str, ...],
    max_rounds: int,
    budget: Budget,
    tags: tuple[str, ...],
    model: str | None,
    opinions: int,
    opinion_pools: tuple[str, ...],
    wait_: bool,
    timeout: float | None,
    as_json: bool,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Submit PROMPT (`-` reads it from standard input) and print the session id."""
    if prompt == "-":
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    if opinions and opinion_pools:
        raise click.UsageError("--opinions and --opinion-pool exclude each other")
    fan_out = list(opinion_pools) or [pool or ""] * opinions

    async def body(client: Client) -> None:
        sid = await client.submit(
            prompt,
            pool=pool,
            criteria=criteria,
            checks=checks,
            max_rounds=max_rounds,
            budget=budget,
            tags=tags,
            model=model,
            opinions=fan_out,
        )
        if not wait_:
            _emit_json({"session_id": sid}) if as_json else click.echo(sid)
            return
        if not as_json:
            click.echo(f"{sid} submitted; waiting (agentbus tap {sid} --from-start to watch)", err=True)
        state = await client.wait(sid, timeout=timeout)
        if as_json:
            _emit_json({"session_id": sid, "status": state.status, "result": state.result, "reason": state.reason})
        else:
            click.echo(f"{sid} {state.status}" + (f" ({state.reason})" if state.reason else ""))
            if state.result:
                click.echo(state.result)
        if state.status != "completed":
            sys.exit(5)

    with_client(settings_from(nats_url, prefix), body)


# --- tap / show / sessions ---------------------------------------------------------------------------


@main.command()
@click.argument("session_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every session.")
@click.option("--from-start", is_flag=True, help="Replay from the first event, then follow.")
@click.option("--since", type=int, help="Replay from this stream sequence, then follow.")
@click.option("--no-follow", is_flag=True, help="Stop at the end of what is recorded.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event, per line.")
@nats_option
def tap(
    session_id: str | None,
    all_: bool,
    from_start: bool,
    since: int | None,
    no_follow: bool,
    as_json: bool,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Watch SESSION (or --all) live; a single session's tap ends when the session does."""
    if bool(session_id) == all_:
        raise click.UsageError("give a SESSION or --all")
    if from_start and since is not None:
        raise click.UsageError("--from-start and --since exclude each other")
    start: int | str = since if since is not None else ("start" if from_start or no_follow else "new")

    async def body(client: Client) -> None:
        sid = None if all_ else session_id
        begin = start
        if sid is not None and start == "new":
            # Live from where the log stands now (no gap between reading the state and following).
            state = await client.state(sid)
            begin = state.last_seq + 1
            if not as_json:
                click.echo(
                    f"tapping {sid} ({state.status}, {state.events} events so far; --from-start replays them). "
                    "Ctrl-C stops.",
                    err=True,
                )
            if state.terminal:
                if not as_json:
                    click.echo(f"{sid} already ended {state.status}" + (f": {state.reason}" if state.reason else ""))
                return
        async for record in client.tap(sid, start=begin, follow=not no_follow):  # type: ignore[arg-type]
            if as_json:
                _emit_json(to_builtins(record))
            else:
                click.echo(render.record_line(record, with_session=sid is None))
            if sid is not None and isinstance(record.event, SessionEnded):
                return

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: state and events.")
@nats_option
def show(session_id: str, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Print the whole log of SESSION and its state."""

    async def body(client: Client) -> None:
        records = await client.show(session_id)
        state = await client.state(session_id)
        if as_json:
            _emit_json({"state": to_builtins(state), "events": [to_builtins(r) for r in records]})
            return
        for record in records:
            click.echo(render.record_line(record))
        click.echo(f"-- {state.status}" + (f" ({state.reason})" if state.reason else ""))
        click.echo(
            f"-- steps {state.steps}, tool calls {state.tool_calls}, tokens {state.usage.total}, "
            f"${state.cost_usd:.4f}" + (f", trace {state.trace_id}" if state.trace_id else "")
        )
        if state.result:
            click.echo(f"-- result: {state.result}")

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.option("--status", help="Only sessions with this status.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session, per line.")
@nats_option
def sessions(status: str | None, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """One line per session: status, pool, age, progress and cost so far."""

    async def body(client: Client) -> None:
        states = await client.sessions(status=status)
        if as_json:
            for s in states:
                _emit_json(to_builtins(s))
            return
        if not states:
            click.echo("no sessions" + (f" with status {status}" if status else ""), err=True)
            return
        width = max(16, *(len(s.session_id) for s in states))
        click.echo(render.session_header(width))
        for s in states:
            click.echo(render.session_line(s, id_width=width))

    with_client(settings_from(nats_url, prefix), body)


# --- steering --------------------------------------------------------------------------------------


@main.command()
@click.argument("session_id")
@click.argument("text")
@click.option("--as", "author", help="Author name (default: your OS user).")
@nats_option
def say(session_id: str, text: str, author: str | None, nats_url: str | None, prefix: str) -> None:
    """Send TEXT to SESSION; the agent reads it at its next step (`-` reads standard input)."""
    if text == "-":
        text = sys.stdin.read()

    async def body(client: Client) -> None:
        seq = await client.say(session_id, text, author=author)
        click.echo(f"said (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.argument("session_id")
@click.option("--reason", default="", help="Why, for the log.")
@nats_option
def cancel(session_id: str, reason: str, nats_url: str | None, prefix: str) -> None:
    """Stop SESSION at its next step boundary (it ends `cancelled`)."""

    async def body(client: Client) -> None:
        seq = await client.cancel(session_id, reason=reason)
        click.echo(f"cancel requested (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.argument("session_id")
@budget_options("New limit")
@nats_option
def resume(
    session_id: str,
    budget: Budget,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Continue a paused SESSION, raising the limits you name; it goes back on its pool's queue."""

    async def body(client: Client) -> None:
        seq = await client.resume(session_id, budget=budget)
        click.echo(f"resumed (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per worker, per line.")
@nats_option
def agents(as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Live agents: pool, worker id, host/container, current sessions, last heartbeat."""

    async def body(client: Client) -> None:
        workers = await client.workers()
        if as_json:
            for w in workers:
                _emit_json(to_builtins(w))
            return
        if not workers:
            click.echo("no live agents", err=True)
            return
        click.echo(render.worker_header())
        for w in workers:
            click.echo(render.worker_line(w))

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.option("--reset", "reset_pool", metavar="POOL", help="Count POOL's spend from zero (lifts its hold).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pool, per line.")
@nats_option
def spend(reset_pool: str | None, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Dollars spent per pool (what the pools file's `ceiling_usd` is checked against), and holds."""

    async def body(client: Client) -> None:
        if reset_pool is not None:
            fresh = await client.reset_spend(reset_pool)
            click.echo(
                f"pool {fresh.pool}: spend reset to $0 and its hold lifted (a supervisor sets it again while"
                " the fleet is over its ceiling); `agentbus resume` its paused sessions"
            )
            return
        totals, holds = await client.spend()
        pools = sorted(set(totals) | set(holds))
        if as_json:
            for name in pools:
                total = totals.get(name)
                hold = holds.get(name)
                _emit_json({
                    "pool": name, "usd": total.usd if total else 0.0, "calls": total.calls if total else 0,
                    "since_ts": total.since_ts if total else 0.0, "hold": to_builtins(hold) if hold else None,
                })  # fmt: skip
            return
        if not pools:
            click.echo("no spend recorded yet", err=True)
            return
        click.echo(render.spend_header())
        for name in pools:
            click.echo(render.spend_line(name, totals.get(name), holds.get(name)))

    with_client(settings_from(nats_url, prefix), body)


@main.command()
@click.option("--pools", "pools_file", help="Pools file (default: an offline scripted pool, or Claude with a key).")
@click.option("--port", default=4222, show_default=True, help="Port of the embedded nats-server (0: any free).")
@click.option("--store-dir", default=".agentbus/nats", show_default=True, help="JetStream file store.")
def up(pools_file: str | None, port: int, store_dir: str) -> None:
    """The whole system on this machine: nats-server, router, evaluator, supervisor (which runs the agents)."""
    from agentbus.up import run_up

    sys.exit(run_up(pools_file=pools_file, port=port, store_dir=store_dir))


# --- bench -----------------------------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Measure agentbus against raw nats-py in the same run."""


@bench.command("log")
@click.option("--events", default=5000, show_default=True, help="Events per measurement.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with raw, agentbus and ratio maps.")
def bench_log(events: int, as_json: bool) -> None:
    """Session-log append and replay rates next to raw nats-py, on a private server."""
    from agentbus.bench import format_report, run_log_bench

    if events < 10:
        raise click.UsageError("--events must be at least 10")
    result = run(lambda: run_log_bench(events))
    _emit_json(result) if as_json else click.echo(format_report(result))


main.add_command(auth_group)  # agentbus auth add | list | revoke


if __name__ == "__main__":  # pragma: no cover
    main()
