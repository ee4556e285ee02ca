"""Commands on the system around the sessions: server, up, agents, spend, bench."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING

import click

from agentbus.cli.options import PORT, emit_json, nats_option, pool_name, run, settings_from, with_client

if TYPE_CHECKING:
    from agentbus.client import Client


@click.command()
@click.option("--port", type=PORT, default=4222, show_default=True, help="Client port on 127.0.0.1 (0: any free port).")
@click.option("--store-dir", default=".agentbus/nats", show_default=True, help="JetStream file store.")
@click.option("--sync-always", is_flag=True, help="fsync every write (survives power loss; slower).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="TLS certificate: clients use tls://.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), help="The certificate's private key.")
@click.option("--tls-ca", default="", help="CA bundle for this user's CLI to check the certificate with.")
@click.option(
    "--prefix", default="agentbus", show_default=True, envvar="AGENTBUS_PREFIX", help="Namespace to provision at start."
)
def server(
    port: int, store_dir: str, sync_always: bool, tls_cert: str | None, tls_key: str | None, tls_ca: str, prefix: str
) -> None:
    """Run the embedded nats-server with JetStream until Ctrl-C or SIGTERM (users: `agentbus auth`)."""
    from agentbus.auth import write_context
    from agentbus.errors import ServerError
    from agentbus.server import NatsServer, provision_namespace

    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    # Signals first: a Ctrl-C while nats-server starts must still stop it in order.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    srv = NatsServer(port=port, store_dir=store_dir, sync_always=sync_always, tls_cert=tls_cert, tls_key=tls_key)
    srv.start()  # a busy port or a store another server holds: one line, exit 4 (ServerInUse)
    try:
        # the streams exist before anyone asks, so a client in any language finds them
        problem = provision_namespace(srv, prefix, tls_ca)
        if problem:
            click.echo(f"agentbus: warning: namespace {prefix} not provisioned at start: {problem}", err=True)
        click.echo(f"nats-server ready on {srv.url} (JetStream store: {srv.store_dir}); Ctrl-C stops it")
        if srv.admin_creds is not None:
            where = write_context(srv.url, srv.admin_creds, tls_ca) if port else None
            found = "your agentbus commands use them for this server" if where else f"AGENTBUS_CREDS={srv.admin_creds}"
            click.echo(f"admin credentials: {srv.admin_creds} ({found}); others: agentbus auth add NAME --role ROLE")
        while not stop.wait(0.5):
            if srv.proc is not None and srv.proc.poll() is not None:
                raise ServerError(f"nats-server exited ({srv.proc.returncode}); see {srv.log_path}")
    finally:
        srv.stop()
    click.echo("nats-server stopped")


@click.command()
@click.option("--pools", "pools_file", help="Pools file (default: an offline scripted pool, or Claude with a key).")
@click.option(
    "--port", type=PORT, default=4222, show_default=True, help="Port of the embedded nats-server (0: any free)."
)
@click.option("--store-dir", default=".agentbus/nats", show_default=True, help="JetStream file store.")
@click.option(
    "--web-port", type=PORT, default=8765, show_default=True,
    help="The web view's port on 127.0.0.1 (0: any free port; 8765 taken: a free one).",
)  # fmt: skip
@click.option("--no-web", is_flag=True, help="Start no web view.")
def up(pools_file: str | None, port: int, store_dir: str, web_port: int, no_web: bool) -> None:
    """The whole system on this machine: nats-server, router, evaluator, supervisor (and its agents), web view."""
    from agentbus.up import run_up

    sys.exit(run_up(pools_file=pools_file, port=port, store_dir=store_dir, web_port=None if no_web else web_port))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per worker, per line.")
@nats_option
def agents(as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Live agents: pool, worker id, host/container, current sessions, last heartbeat."""
    from agentbus import render
    from agentbus.messages import to_builtins

    async def body(client: Client) -> None:
        workers = await client.workers()
        if as_json:
            for w in workers:
                emit_json(to_builtins(w))
            return
        if not workers:
            click.echo("no live agents", err=True)
            return
        click.echo(render.worker_header())
        for w in workers:
            click.echo(render.worker_line(w))

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pool, per line.")
@nats_option
def pools(as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Every pool: live agents, free slots, tasks waiting and running, the oldest waiting, who serves it."""
    import dataclasses

    from agentbus import render

    async def body(client: Client) -> None:
        found = await client.pools()
        if as_json:
            for p in found:
                emit_json({**dataclasses.asdict(p), "served": p.served})
            return
        if not found:
            click.echo("no pools yet: nothing has been submitted to one, and no agent or supervisor runs", err=True)
            return
        click.echo(render.pool_header())
        for p in found:
            click.echo(render.pool_line(p))

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.option(
    "--reset", "reset_pool", metavar="POOL", callback=pool_name, help="Count POOL's spend from zero (lifts its hold)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pool, per line.")
@nats_option
def spend(reset_pool: str | None, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Dollars spent per pool (what the pools file's `ceiling_usd` is checked against), and holds."""
    from agentbus import render
    from agentbus.messages import to_builtins

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
                emit_json({
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


@click.group()
def bench() -> None:
    """Measure agentbus against raw nats-py in the same run."""


@bench.command("log")
@click.option("--events", type=click.IntRange(min=10), default=5000, show_default=True, help="Events per measurement.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with raw, agentbus and ratio maps.")
def bench_log(events: int, as_json: bool) -> None:
    """Session-log append and replay rates next to raw nats-py, on a private server."""
    from agentbus.bench import format_report, run_log_bench

    result = run(lambda: run_log_bench(events))
    emit_json(result) if as_json else click.echo(format_report(result))


@bench.command("e2e")
@click.option(
    "--sessions",
    type=click.IntRange(min=10),
    default=100,
    show_default=True,
    help="Sessions per latency measurement (four times as many for throughput).",
)
@click.option("--agents", type=click.IntRange(min=1), default=1, show_default=True, help="Agent processes (tasks).")
@click.option("--slots", type=click.IntRange(min=1), default=16, show_default=True, help="Sessions per agent at once.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with raw, agentbus and ratio maps.")
def bench_e2e(sessions: int, agents: int, slots: int, as_json: bool) -> None:
    """Whole sessions (submit, route, run, end) next to a raw nats-py pipeline, on a private server."""
    import services.agent.worker
    import services.router.router  # noqa: F401 - imported before the heap is frozen, as in their processes
    from agentbus.bench import format_e2e_report, run_e2e_bench
    from agentbus.service import freeze_heap

    freeze_heap()  # as each service's process does once it is up: both sides run in this one process
    result = run(lambda: run_e2e_bench(sessions, agents=agents, slots=slots))
    emit_json(result) if as_json else click.echo(format_e2e_report(result))


COMMANDS = (server, up, agents, pools, spend, bench)
