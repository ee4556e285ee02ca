"""`agentbus auth`: the users of a server this machine runs (add, list, revoke), and `init` for compose.

These commands edit the server's state directory (`--store-dir`, the same as `agentbus server`'s)
and signal the running server to reload it; they need no connection. Refusals and bad input are
`AgentBusError`s, which the `agentbus` group prints as one line with their exit code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from agentbus.auth import AuthStore, User, identity, local_user_name
from agentbus.errors import UsageError
from agentbus.roles import ROLE_HELP, ROLES

_STORE = click.option(
    "--store-dir",
    default=".agentbus/nats",
    show_default=True,
    envvar="AGENTBUS_STORE_DIR",
    help="The server's state directory (its users live in <store>/auth).",
)


def _store(store_dir: str) -> AuthStore:
    return AuthStore(Path(store_dir) / "auth")


@click.group()
def auth() -> None:
    """Users of a server started here: nkey credentials, one role each (`agentbus auth add --help`)."""


@auth.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the user may do (see below).")
@click.option("--session", "sessions", multiple=True, metavar="ID", help="codriver/observer: only this session.")
@click.option("--pool", "pools", multiple=True, metavar="POOL", help="agent: only this pool's work.")
@click.option("--prefix", envvar="AGENTBUS_PREFIX", default="agentbus", show_default=True, help="Namespace.")
@click.option(
    "--out", type=click.Path(dir_okay=False, allow_dash=True), help="Where to write them (mode 0600); - prints them."
)
@click.option("--url", default="", help="The server's address as the user will reach it (kept in the file).")
@_STORE
def add(
    name: str,
    role: str,
    sessions: tuple[str, ...],
    pools: tuple[str, ...],
    prefix: str,
    out: str | None,
    url: str,
    store_dir: str,
) -> None:
    """Make user NAME and write its credentials file; prints the file's path."""
    ident = identity(name, role, prefix=prefix, sessions=sessions, pools=pools)
    store = _store(store_dir)
    if out == "-":  # e.g. `docker compose exec -T nats agentbus auth add ... --out - > me.creds`
        with tempfile.TemporaryDirectory() as tmp:
            path = store.add(ident, Path(tmp) / "user.creds", url=url)
            click.echo(path.read_text(), nl=False)
        store.reload()
        _unreached(store)
        return
    path = store.add(ident, Path(out) if out else None, url=url)
    store.reload()
    _unreached(store)
    click.echo(str(path))
    click.echo(f"give it to {name} (--creds FILE or AGENTBUS_CREDS); it is their secret", err=True)


add.help = (add.help or "") + "\n\n\b\nRoles:\n" + "".join(f"  {r:<9} {ROLE_HELP[r]}\n" for r in ROLES)


@auth.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per user.")
@_STORE
def list_(as_json: bool, store_dir: str) -> None:
    """Every user: name, role, namespace, grants."""
    users = _store(store_dir).users()
    if as_json:
        for user in users:
            click.echo(json.dumps({"name": user.identity.user, **user.to_json()}))
        return
    if not users:
        click.echo(f"no users in {_store(store_dir).directory} (a server started there makes its admin)", err=True)
        return
    for user in users:
        click.echo(_line(user))


def _line(user: User) -> str:
    i = user.identity
    grants = (
        f"sessions {','.join(i.sessions)}"
        if i.sessions
        else f"pools {','.join(i.pools)}"
        if i.pools
        else "every namespace"
        if i.role == "admin"
        else "all"
    )
    return f"{i.user:<20} {i.role or '-':<9} {i.prefix:<12} {grants}"


@auth.command("revoke")
@click.argument("name")
@_STORE
def revoke(name: str, store_dir: str) -> None:
    """Remove user NAME: the server reloads, closes its connections and refuses it from now on."""
    store = _store(store_dir)
    user = store.revoke(name)
    reloaded = store.reload()
    where = f"{reloaded} server(s) reloaded" if reloaded else "no running server found; it applies at the next start"
    click.echo(f"revoked {user.identity.user} ({user.identity.role}); {where}")
    _unreached(store)


def _unreached(store: AuthStore) -> None:
    """Say which servers of this store a reload could not reach, and how to reach them."""
    if store.unreached:
        names = ", ".join(store.unreached)
        click.echo(
            f"not reloaded from here: {len(store.unreached)} more server(s) of this store in other containers"
            f" (pid files {names}); they keep the old users until reloaded where they run"
            " (compose/cluster.yaml: `docker compose kill -s HUP nats-2 nats-3`)",
            err=True,
        )


@auth.command("init")
@click.option("--admin", default=None, help="Name of the first admin [default: your OS user name].")
@click.option(
    "--ensure",
    "ensures",
    multiple=True,
    metavar="NAME:ROLE:FILE",
    help="Also make this user with its credentials at FILE, unless FILE exists (compose's service and agents).",
)
@click.option("--prefix", envvar="AGENTBUS_PREFIX", default="agentbus", show_default=True, help="Namespace.")
@_STORE
def init(admin: str | None, ensures: tuple[str, ...], prefix: str, store_dir: str) -> None:
    """Make the users a deployment starts with (idempotent; run before the server starts)."""
    store = _store(store_dir)
    admin_creds = store.init(admin or local_user_name())
    click.echo(f"admin credentials: {admin_creds}")
    changed = False
    for spec in ensures:
        try:
            name, role, file = spec.split(":", 2)
        except ValueError:
            raise UsageError(f"--ensure {spec!r}: expected NAME:ROLE:FILE") from None
        ident = identity(name, role, prefix=prefix, sessions=(), pools=())
        if store.ensure(ident, Path(file)):
            changed = True
            click.echo(f"{name} ({role}): {file}")
    if changed:
        store.reload()
