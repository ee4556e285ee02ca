"""Commands on sessions: submit, tap, show, sessions, cancel, resume (steering verbs are in `control.py`)."""

from __future__ import annotations

import contextlib
import shutil
import sys
from typing import TYPE_CHECKING

import click

from agentbus.cli.options import budget_options, emit_json, nats_option, pool_name, settings_from, with_client

if TYPE_CHECKING:
    from agentbus.client import Client
    from agentbus.messages import Budget
    from agentbus.state import SessionState


@click.command()
@click.argument("prompt")
@click.option("--pool", callback=pool_name, help="Pool to run it on (default: let the router choose).")
@click.option("--criterion", "criteria", multiple=True, help="A criterion the evaluator grades (repeatable).")
@click.option("--check", "checks", multiple=True, help="A command that must exit 0 in the workspace (repeatable).")
@click.option("--max-rounds", default=3, show_default=True, help="Evaluation rounds before giving up.")
@budget_options("Budget")
@click.option("--tag", "tags", multiple=True, help="Routing tag (repeatable).")
@click.option("--model", help="Model spec for this session, if the pool allows overrides.")
@click.option("--opinions", type=int, default=0, help="Fan-out: run the task in N sibling sessions (on --pool).")
@click.option(
    "--opinion-pool",
    "opinion_pools",
    multiple=True,
    callback=pool_name,
    help="Fan-out: one sibling per pool (repeatable).",
)
@click.option(
    "--approve",
    "approve",
    multiple=True,
    metavar="TOOL",
    help="A tool whose calls wait for a person's approval, on top of the pool's list (repeatable).",
)
@click.option("--base", metavar="REF", help="A pool on a repository: the ref the session's branch starts from.")
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
    approve: tuple[str, ...],
    base: str | None,
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
    submitted: list[str] = []

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
            approve=approve,
            base=base,
        )
        submitted.append(sid)
        for name in sorted({p for p in (pool, *fan_out) if p}):
            if not await client.serves(name):
                click.echo(_unserved(name), err=True)
        if not wait_:
            emit_json({"session_id": sid}) if as_json else click.echo(sid)
            return
        if as_json:
            state = await client.wait(sid, timeout=timeout)
        else:
            click.echo(
                f"{sid} submitted; waiting (agentbus tap {sid} --from-start to watch; Ctrl-C stops waiting)", err=True
            )
            state = await _wait_live(client, sid, timeout)
        if as_json:
            branch = {"branch": state.branch, "commit": state.commit} if state.branch else {}
            emit_json({"session_id": sid, "status": state.status, "result": state.result, "reason": state.reason,
                       **branch})  # fmt: skip
        else:
            from agentbus.render import branch_line, clean

            click.echo(clean(f"{sid} {state.status}" + (f" ({state.reason})" if state.reason else ""), newlines=False))
            if state.result:
                click.echo(clean(state.result))
            if state.branch:
                click.echo(branch_line(state))
        if state.status != "completed":
            sys.exit(5)

    try:
        with_client(settings_from(nats_url, prefix), body)
    except KeyboardInterrupt:
        if not submitted:
            raise
        sid = submitted[0]
        from agentbus.errors import Interrupted

        raise Interrupted(
            f"interrupted; session {sid} goes on (agentbus tap {sid} to watch, agentbus cancel {sid} to stop it)"
        ) from None


def _unserved(pool: str) -> str:
    return (
        f"agentbus: warning: no agent or supervisor serves pool {pool}; the task waits until one does "
        f"(agentbus agent --pool {pool} --model scripted:demo, or [pools.{pool}] in a pools file for agentbus up)"
    )


@click.command()
@click.argument("session_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every session.")
@click.option("--from-start", is_flag=True, help="Replay from the first event, then follow.")
@click.option("--since", type=click.IntRange(min=1), help="Replay from this stream sequence, then follow.")
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
    from agentbus import render
    from agentbus.messages import SessionEnded, to_builtins

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
                    line = f"{sid} already ended {state.status}" + (f": {state.reason}" if state.reason else "")
                    click.echo(render.clean(line, newlines=False))
                return
        async for record in client.tap(sid, start=begin, follow=not no_follow):  # type: ignore[arg-type]
            if as_json:
                emit_json(to_builtins(record))
            else:
                click.echo(render.record_line(record, with_session=sid is None))
            if sid is not None and isinstance(record.event, SessionEnded):
                return

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: state and events.")
@nats_option
def show(session_id: str, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Print the whole log of SESSION and its state."""
    from agentbus import render
    from agentbus.messages import to_builtins

    async def body(client: Client) -> None:
        records = await client.show(session_id)
        state = await client.state(session_id)
        if as_json:
            emit_json({"state": to_builtins(state), "events": [to_builtins(r) for r in records]})
            return
        for record in records:
            click.echo(render.record_line(record))
        click.echo(render.clean(f"-- {state.status}" + (f" ({state.reason})" if state.reason else ""), newlines=False))
        click.echo(
            f"-- steps {state.steps}, tool calls {state.tool_calls}, tokens {state.usage.total}, "
            f"${state.cost_usd:.4f}" + (f", trace {state.trace_id}" if state.trace_id else "")
        )
        if state.result:
            click.echo(f"-- result: {render.clean(state.result)}")
        if state.branch:
            click.echo(render.branch_line(state))

    with_client(settings_from(nats_url, prefix), body)


STATUSES = (
    "pending", "queued", "running", "waiting", "awaiting_approval", "evaluating", "paused", "completed", "failed",
    "cancelled",
)  # fmt: skip
"""Every session status (`agentbus.messages.Status`, which a test keeps this in step with; not imported
here, so `agentbus --help` stays light)."""


def _status(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and value not in STATUSES:
        raise click.BadParameter(f"unknown status {value!r}; valid: {', '.join(STATUSES)}", ctx, param)
    return value


@click.command()
@click.option(
    "--status", callback=_status, metavar="STATUS", help=f"Only sessions with this status: {', '.join(STATUSES)}."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session, per line.")
@click.option("--prune", is_flag=True, help="Remove the worktrees of sessions that ended or are gone (branches stay).")
@click.option(
    "--repo",
    "repos",
    multiple=True,
    metavar="PATH",
    help="With --prune: a repository (default: those agents announce).",
)
@nats_option
def sessions(
    status: str | None, as_json: bool, prune: bool, repos: tuple[str, ...], nats_url: str | None, prefix: str
) -> None:
    """One line per session: status, pool, age, progress and cost so far."""
    from agentbus import render
    from agentbus.messages import to_builtins

    if repos and not prune:
        raise click.UsageError("--repo goes with --prune")

    async def body(client: Client) -> None:
        if prune:
            await _prune(client, repos, as_json)
            return
        states = await client.sessions(status=status)
        if as_json:
            for s in states:
                emit_json(to_builtins(s))
            return
        if not states:
            click.echo("no sessions" + (f" with status {status}" if status else ""), err=True)
            return
        width = max(16, *(len(s.session_id) for s in states))
        click.echo(render.session_header(width))
        for s in states:
            click.echo(render.session_line(s, id_width=width))

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@click.option("--reason", default="", help="Why, for the log.")
@nats_option
def cancel(session_id: str, reason: str, nats_url: str | None, prefix: str) -> None:
    """Stop SESSION at its next step boundary (it ends `cancelled`)."""

    async def body(client: Client) -> None:
        seq = await client.cancel(session_id, reason=reason)
        click.echo(f"cancel requested (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@budget_options("New limit")
@nats_option
def resume(session_id: str, budget: Budget, nats_url: str | None, prefix: str) -> None:
    """Continue a paused SESSION, raising the limits you name; it goes back on its pool's queue."""

    async def body(client: Client) -> None:
        seq = await client.resume(session_id, budget=budget)
        click.echo(f"resumed (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


async def _prune(client: Client, paths: tuple[str, ...], as_json: bool) -> None:
    """`sessions --prune`: worktrees whose sessions ended (or left the log) go; their branches stay."""
    import asyncio

    from agentbus import branches, render
    from agentbus.repo import Repo

    repos = [await asyncio.to_thread(Repo.open, p) for p in paths] or branches.announced_repos(await client.workers())
    if not repos:
        from agentbus.errors import UsageError

        raise UsageError("no repository to prune: name one with --repo PATH (no live agent here announces one)")
    pruned = await branches.prune(client.log, repos)
    for p in pruned:
        if as_json:
            emit_json({"session_id": p.session_id, "worktree": str(p.worktree), "repo": str(p.repo), "why": p.why,
                       **({"kept": p.kept} if p.kept else {})})  # fmt: skip
        elif p.kept:
            click.echo(render.clean(f"kept {p.worktree} (session {p.session_id}, {p.why}): {p.kept}", newlines=False))
        else:
            click.echo(render.clean(f"removed {p.worktree} (session {p.session_id}, {p.why}); branch agentbus/"
                                    f"{p.session_id} stays in {p.repo}", newlines=False))  # fmt: skip
    if not pruned and not as_json:
        click.echo(f"nothing to prune in {', '.join(str(r.top) for r in repos)}", err=True)


COMMANDS = (submit, tap, show, sessions, cancel, resume)


# --- submit --wait: one live status line --------------------------------------------------------


class _LiveStatus:
    """`submit --wait`'s status: one line rewritten in place when stderr is a terminal, else a plain
    line each time it changes (so logs and pipes get a readable history, not carriage returns)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.tty = sys.stderr.isatty()
        self.state: SessionState | None = None
        self.unserved = False  # queued on a pool that nothing serves right now
        self._shown = ""

    def show(self) -> None:
        from agentbus.render import clean

        text = clean(f"{self.session_id}: {self._describe()}", newlines=False)
        if text == self._shown:
            return
        self._shown = text
        if self.tty:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line could not be rewritten
            click.echo("\r\x1b[K" + text[:width], nl=False, err=True)
        else:
            click.echo(text, err=True)

    def close(self) -> None:
        if self.tty and self._shown:
            click.echo("", err=True)  # end the line that was being rewritten

    def _describe(self) -> str:
        s = self.state
        if s is None:
            return "submitted"
        match s.status:
            case "pending":
                return "waiting for a router to choose its pool"
            case "queued" if self.unserved:
                return f"queued on pool {s.pool}; nothing serves it (agentbus agent --pool {s.pool} --model ...)"
            case "queued":
                return f"queued on pool {s.pool}"
            case "running":
                # the step being worked on: the first before its reply, then the latest replied to
                return f"running step {max(s.steps, 1)} ({s.tool_calls} tool calls so far, ${s.cost_usd:.4f})"
            case "waiting" if s.waiting_for == "subtask":
                return f"waiting for its subtask ({s.reason})"
            case "waiting":
                return f"waiting for your answer: agentbus say {s.session_id} TEXT"
            case "awaiting_approval":
                return f"waiting for an approval of {s.question[:60]}: agentbus approve {s.session_id}"
            case "evaluating":
                return f"evaluating round {s.round}"
            case _:
                return s.status + (f" ({s.reason})" if s.reason else "")


async def _wait_live(client: Client, session_id: str, timeout: float | None) -> SessionState:
    """`Client.wait`, saying what the session is doing while it waits."""
    import asyncio  # here, like every heavier import of this module: `agentbus --help` needs none

    from agentbus.errors import Timeout

    status = _LiveStatus(session_id)
    try:
        return await asyncio.wait_for(_follow(client, status), timeout)
    except TimeoutError as err:
        raise Timeout(f"session {session_id} still running after {timeout:g}s") from err
    finally:
        status.close()


async def _follow(client: Client, status: _LiveStatus) -> SessionState:
    import asyncio

    from agentbus.state import fold

    state = status.state = await client.state(status.session_id)
    status.show()
    if _settled(state):
        return state
    prober = asyncio.create_task(_probe_served(client, status))
    try:
        async for record in client.tap(status.session_id, start=state.last_seq + 1):
            state = status.state = fold(state, record)
            status.show()
            if _settled(state):
                return state
    finally:
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
    return state  # pragma: no cover - a tap ends only with the connection


def _settled(state: SessionState) -> bool:
    return state.terminal or state.status == "paused"


async def _probe_served(client: Client, status: _LiveStatus) -> None:
    """While the session is queued, look every 2 s whether anything serves its pool (a refresh of
    what is shown, not a synchronisation: the tap above is what ends the wait)."""
    import asyncio

    from agentbus.errors import AgentBusError

    while True:
        s = status.state
        with contextlib.suppress(AgentBusError):  # a NATS hiccup leaves the line as it was
            unserved = s is not None and s.status == "queued" and bool(s.pool) and not await client.serves(str(s.pool))
            if unserved != status.unserved:
                status.unserved = unserved
                status.show()
        await asyncio.sleep(2)
