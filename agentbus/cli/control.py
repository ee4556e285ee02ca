"""Steering verbs, each an event in the session's log: say (steer or --queue), interrupt, approve, inbox."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from agentbus.cli.options import emit_json, nats_option, settings_from, with_client

if TYPE_CHECKING:
    from agentbus.client import Client
    from agentbus.inbox import InboxItem


@click.command()
@click.argument("session_id")
@click.argument("text")
@click.option("--as", "author", help="A display name shown with the message (default: your OS user).")
@click.option(
    "--queue", is_flag=True,
    help="A follow-up: delivered when the model would end its turn (reopens a completed session).",
)  # fmt: skip
@click.option(
    "--wait-delivered", is_flag=True, help="Return once a model request carried it (exit 5 if it ended first)."
)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="With --wait-delivered: seconds (exit 5).")
@nats_option
def say(
    session_id: str,
    text: str,
    author: str | None,
    queue: bool,
    wait_delivered: bool,
    timeout: float | None,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Steer SESSION: the model reads TEXT at its next step (`-` reads standard input)."""
    if text == "-":
        text = sys.stdin.read()

    async def body(client: Client) -> None:
        seq = await client.say(session_id, text, author=author, queue=queue)
        click.echo(f"{'queued' if queue else 'said'} (#{seq})")
        if wait_delivered:
            receipt = await client.wait_delivered(session_id, seq, timeout=timeout)
            click.echo(f"delivered with step {receipt.step} (#{receipt.message_seq})")

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@click.argument("text", required=False, default="")
@click.option("--as", "author", help="A display name (default: your OS user).")
@nats_option
def interrupt(session_id: str, text: str, author: str | None, nats_url: str | None, prefix: str) -> None:
    """Stop SESSION now: the model call in flight is cancelled or the running tool killed. With TEXT it
    goes on with that; without, it pauses until `say` or `resume`."""

    async def body(client: Client) -> None:
        seq = await client.interrupt(session_id, text, author=author)
        then = "it goes on with your text" if text else f"it pauses; `agentbus say {session_id} TEXT` continues it"
        click.echo(f"interrupt sent (#{seq}); {then}")

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@click.argument("call_id", required=False)
@click.option("--deny", is_flag=True, help="Deny the call: the model hears who denied it and why.")
@click.option("--reason", default="", help="Why (the model reads it when the call is denied).")
@click.option("--as", "author", help="A display name (default: your OS user).")
@nats_option
def approve(
    session_id: str,
    call_id: str | None,
    deny: bool,
    reason: str,
    author: str | None,
    nats_url: str | None,
    prefix: str,
) -> None:
    """Approve (or --deny) a tool call of SESSION that waits for a person; CALL_ID when several wait."""

    async def body(client: Client) -> None:
        seq, call = await client.approve(session_id, call_id, deny=deny, reason=reason, author=author)
        click.echo(f"{'denied' if deny else 'approved'} {call} (#{seq})")

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.option("--follow", is_flag=True, help="Keep watching: print each session as it comes in or leaves.")
@click.option("--dismiss", "dismiss", metavar="SESSION", help="Record that you looked: SESSION leaves every inbox.")
@click.option("--note", default="", help="With --dismiss: a note for the log.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session, per line.")
@nats_option
def inbox(follow: bool, dismiss: str | None, note: str, as_json: bool, nats_url: str | None, prefix: str) -> None:
    """Only the sessions that need a person: waiting for an answer or an approval, paused, or failed."""

    async def body(client: Client) -> None:
        if dismiss is not None:
            seq = await client.dismiss(dismiss, note=note)
            click.echo(f"dismissed (#{seq})")
            return
        shown = 0
        async for item in client.inbox(follow=follow):
            shown += 1
            if as_json:
                emit_json(_json(item))
            else:
                click.echo(_line(item))
        if not shown and not as_json:
            click.echo("nothing needs a person", err=True)

    with_client(settings_from(nats_url, prefix), body)


def _json(item: InboxItem) -> dict[str, object]:
    from agentbus.messages import to_builtins

    return {**to_builtins(item), "waiting_s": round(item.waiting_s, 1)}


def _line(item: InboxItem) -> str:
    from agentbus.render import age, clean

    if not item.present:
        return clean(f"{item.session_id}  left the inbox ({item.status})", newlines=False)
    waited = age(time.time() - item.since_ts) if item.since_ts else "?"
    head = f"{item.session_id}  {item.status:<17} {waited:>5}  ${item.cost_usd:.4f}  {item.why}"
    return clean(head, newlines=False) + "\n    " + clean(item.command, newlines=False)


COMMANDS = (say, interrupt, approve, inbox)
