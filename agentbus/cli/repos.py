"""Commands on sessions' branches (pools on a git repository): diff and merge.

git runs here, on the repository the session's log names (or `--repo`), so run them where the
repository is on the same path as the agents see it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from agentbus.cli.options import emit_json, nats_option, settings_from, with_client

if TYPE_CHECKING:
    from agentbus.client import Client

_REPO_HELP = "The repository, if not at the path the session's log names."


@click.command()
@click.argument("session_id")
@click.option("--stat", is_flag=True, help="Only the files changed and their line counts.")
@click.option("--repo", metavar="PATH", help=_REPO_HELP)
@nats_option
def diff(session_id: str, stat: bool, repo: str | None, nats_url: str | None, prefix: str) -> None:
    """Print what SESSION changed on its branch, from where the branch started to its last commit."""

    async def body(client: Client) -> None:
        from agentbus.branches import session_diff

        await client.state(session_id)  # a bad id or no such session: one line, before any git runs
        text = await session_diff(client.log, session_id, stat=stat, repo_path=repo, color=sys.stdout.isatty())
        click.echo(text, nl=False)

    with_client(settings_from(nats_url, prefix), body)


@click.command()
@click.argument("session_id")
@click.option("--into", metavar="BRANCH", help="Merge into this branch instead of the session's base.")
@click.option("--repo", metavar="PATH", help=_REPO_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the recorded branch_merged event as JSON.")
@nats_option
def merge(
    session_id: str, into: str | None, repo: str | None, as_json: bool, nats_url: str | None, prefix: str
) -> None:
    """Merge an ended SESSION's branch into its base: a fast-forward, else a merge commit.

    Refused on a conflict, naming the files, with nothing changed. Recorded in the session's log.
    """

    async def body(client: Client) -> None:
        from agentbus.messages import to_builtins

        event = await client.merge(session_id, into=into, repo=repo)
        if as_json:
            emit_json(to_builtins(event))
            return
        how = "fast-forward" if event.fast_forward else f"merge commit {event.result[:12]}"
        click.echo(f"merged {event.branch} ({event.commit[:12]}) into {event.into}: {how}")

    with_client(settings_from(nats_url, prefix), body)


COMMANDS = (diff, merge)
