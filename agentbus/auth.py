"""Who may connect: nkey credentials, the server's users file, its authorization block, and local contexts.

Users authenticate with nkeys (Ed25519): the server's configuration holds only public keys and
each connection signs a nonce with its seed, so no secret ever crosses the wire or sits in the
server's files. A credentials file carries the seed and, beside it, what agentbus needs to know
without asking the server: the user's name, role, namespace and grants.

The server's state directory (`<store>/auth/`) keeps:
- `users.json`: every user's role, grants and public key (no secrets);
- `authorization.conf`: the nats-server block generated from it (included by the server's config);
- `<name>.creds`: credentials made there (the local admin's on first start), mode 0600;
- `pids/`: the pid files of the servers that include this block, signalled to reload on a change.

A local context (`~/.config/agentbus/contexts/<host>-<port>.toml`, or `$AGENTBUS_CONTEXT_DIR`)
names the admin credentials of a server this user started, so the CLI finds them by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import signal
import time
import tomllib
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys

from agentbus.errors import NotAuthenticated, UsageError
from agentbus.roles import ROLES, Identity, Permissions, Role, permissions
from agentbus.subjects import DEFAULT_PREFIX, Namespace, valid_token

_RELOADED = "Reloaded server configuration"


# --- credentials -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A user's seed and what agentbus knows about the user (identity); `nats_creds` instead for a
    plain NATS `.creds` file (a user JWT and seed), whose role agentbus cannot know."""

    identity: Identity
    seed: str = ""
    nats_creds: Path | None = None
    url: str = ""
    path: Path | None = None

    @property
    def public_key(self) -> str:
        return public_key(self.seed)


def new_seed() -> str:
    """A fresh user nkey seed (`SU...`)."""
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    """The public nkey (`U...`) of a user seed."""
    try:
        return str(nkeys.from_seed(bytearray(seed.encode())).public_key.decode())
    except Exception as err:  # nkeys raises its own errors for a malformed seed
        raise NotAuthenticated(f"not a user nkey seed: {type(err).__name__}") from err


def render_creds(creds: Credentials) -> str:
    ident = creds.identity
    grants = ""
    if ident.sessions:
        grants += f", sessions {', '.join(ident.sessions)}"
    if ident.pools:
        grants += f", pools {', '.join(ident.pools)}"
    return (
        f"# agentbus credentials: user {ident.user}, role {ident.role}, namespace {ident.prefix}{grants}\n"
        f"# Secret: whoever holds this file is {ident.user}. `agentbus auth revoke {ident.user}` ends it.\n"
        f"user = {json.dumps(ident.user)}\n"
        f"role = {json.dumps(ident.role)}\n"
        f"prefix = {json.dumps(ident.prefix)}\n"
        f"sessions = {json.dumps(list(ident.sessions))}\n"
        f"pools = {json.dumps(list(ident.pools))}\n"
        f"url = {json.dumps(creds.url)}\n"
        f"seed = {json.dumps(creds.seed)}\n"
    )


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, replacing any old one in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_creds(path: str | os.PathLike[str]) -> Credentials:
    """An agentbus credentials file, a NATS `.creds` file (JWT and seed) or a bare seed file."""
    where = Path(path)
    try:
        text = where.read_text()
    except OSError as err:
        raise NotAuthenticated(f"cannot read credentials {where}: {err.strerror or err}") from err
    if "BEGIN NATS USER JWT" in text:
        return Credentials(identity=Identity(user=_jwt_name(text)), nats_creds=where, path=where)
    bare = text.strip()
    if bare.startswith("SU") and "\n" not in bare:
        return Credentials(identity=Identity(user="nkey"), seed=bare, path=where)
    try:
        data = tomllib.loads(text)
        ident = Identity(
            user=str(data["user"]),
            role=data.get("role") or None,
            prefix=str(data.get("prefix") or DEFAULT_PREFIX),
            sessions=tuple(str(s) for s in data.get("sessions") or ()),
            pools=tuple(str(p) for p in data.get("pools") or ()),
        )
        seed = str(data["seed"])
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as err:
        raise NotAuthenticated(f"{where} is not a credentials file: {err}") from err
    public_key(seed)  # a malformed seed fails here, not at connect
    return Credentials(identity=ident, seed=seed, url=str(data.get("url") or ""), path=where)


def _jwt_name(text: str) -> str:
    # the user's name is in the JWT's claims; a plain NATS user is labelled, never trusted, by it
    with contextlib.suppress(Exception):
        import base64

        token = text.split("BEGIN NATS USER JWT-----", 1)[1].split("------END", 1)[0].strip()
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(claims.get("name") or ""))[:64]
        if name:
            return name
    return "nats-user"


def local_user_name() -> str:
    """The OS user's name as a subject token (the local admin's user name)."""
    try:
        name = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        name = os.environ.get("USER", "")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    return name or "admin"


# --- the server's users ------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """A user the server accepts: identity and public key (the seed lives only in the credentials)."""

    identity: Identity
    public_key: str
    created_ts: float = 0.0

    def to_json(self) -> dict[str, Any]:
        i = self.identity
        return {
            "role": i.role, "prefix": i.prefix, "sessions": list(i.sessions), "pools": list(i.pools),
            "public_key": self.public_key, "created_ts": self.created_ts,
        }  # fmt: skip


@dataclass
class AuthStore:
    """The users of one server (or of every node of a cluster sharing this directory)."""

    directory: Path
    _users: dict[str, User] = field(default_factory=dict, init=False, repr=False)
    # servers of this store the last `reload` could not tell apart from another (other pid namespaces)
    unreached: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    @property
    def users_file(self) -> Path:
        return self.directory / "users.json"

    @property
    def config_file(self) -> Path:
        return self.directory / "authorization.conf"

    @property
    def pids_dir(self) -> Path:
        return self.directory / "pids"

    def creds_path(self, name: str) -> Path:
        return self.directory / f"{name}.creds"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (three cluster nodes may start at once)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> None:
        self._users = {}
        if not self.users_file.exists():
            return
        raw = json.loads(self.users_file.read_text())
        for name, u in raw.get("users", {}).items():
            ident = Identity(
                user=name,
                role=u["role"],
                prefix=u.get("prefix", DEFAULT_PREFIX),
                sessions=tuple(u.get("sessions", ())),
                pools=tuple(u.get("pools", ())),
            )
            self._users[name] = User(ident, u["public_key"], float(u.get("created_ts", 0.0)))

    def _save(self) -> None:
        data = {"users": {name: u.to_json() for name, u in sorted(self._users.items())}}
        write_private(self.users_file, json.dumps(data, indent=2) + "\n")
        write_private(self.config_file, authorization_block(list(self._users.values())))

    def users(self) -> list[User]:
        with self._locked():
            return sorted(self._users.values(), key=lambda u: u.identity.user)

    def init(self, admin: str) -> Path:
        """On first start: an admin user with credentials here; later: the block as it stands.
        Returns the path of the first admin's credentials."""
        with self._locked():
            # where the servers using this block write their pid (`nats-server --pid`), so `reload()`
            # finds them; nats-server does not make the directory and refuses to start without it
            self.pids_dir.mkdir(exist_ok=True)
            if not self._users:
                self._add(Identity(user=admin, role="admin"), self.creds_path(admin), url="")
            elif not self.config_file.exists():
                self._save()
            admins = sorted((u for u in self._users.values() if u.identity.role == "admin"), key=lambda u: u.created_ts)
            first = admins[0].identity.user if admins else admin
        return self.creds_path(first)

    def add(self, ident: Identity, out: Path | None = None, *, url: str = "") -> Path:
        """A new user: credentials written to `out` (default: in this directory). Then `reload()`."""
        if ident.role is None:
            raise UsageError(f"a role is required: {', '.join(ROLES)}")
        Namespace(ident.prefix)  # a bad prefix is refused before anything is written
        with self._locked():
            if ident.user in self._users:
                raise UsageError(f"user {ident.user} exists; revoke it first to issue new credentials")
            return self._add(ident, out or self.creds_path(ident.user), url=url)

    def _add(self, ident: Identity, path: Path, *, url: str) -> Path:
        seed = new_seed()
        write_private(path, render_creds(Credentials(identity=ident, seed=seed, url=url)))
        self._users[ident.user] = User(ident, public_key(seed), time.time())
        self._save()
        return path

    def ensure(self, ident: Identity, path: Path) -> bool:
        """This user with these grants and credentials at `path`, made (or remade, when its
        credentials are gone or its grants differ) if need be; True if anything changed."""
        current = next((u for u in self.users() if u.identity.user == ident.user), None)
        same = current is not None and current.identity == ident and path.exists()
        if same and current is not None and public_key(read_creds(path).seed) == current.public_key:
            return False
        if current is not None:
            self.revoke(ident.user)
        self.add(ident, path)
        return True

    def revoke(self, name: str) -> User:
        """Remove a user; after `reload()` the server drops its connections and refuses it from then on."""
        with self._locked():
            user = self._users.pop(name, None)
            if user is None:
                raise UsageError(f"no user {name}")
            if user.identity.role == "admin" and not any(u.identity.role == "admin" for u in self._users.values()):
                self._users[name] = user
                raise UsageError(f"{name} is the last admin; add another admin before revoking it")
            self._save()
            self.creds_path(name).unlink(missing_ok=True)
        return user

    # --- reloading the servers that use this block ---------------------------------------------------

    def pid_file(self, server: str) -> Path:
        return self.pids_dir / f"{server}.pid"

    def reload(self, log_files: Sequence[Path] = ()) -> int:
        """Signal every live server using this block to reload it (SIGHUP); returns how many.
        With `log_files`, wait until each has logged the reload.

        Servers of this store in other pid namespaces (compose's cluster nodes, each pid 1 in its
        own container) write pid files naming a pid this process cannot tell apart from its own
        server's: those are signalled once, counted once, and named in `unreached`, so nobody is
        told a revocation reached servers it did not."""
        before = [_count(p) for p in log_files]
        signalled: set[int] = set()
        self.unreached = []
        for pid_file in sorted(self.pids_dir.glob("*.pid")) if self.pids_dir.exists() else []:
            pid = _nats_server_pid(pid_file)
            if pid is None:
                continue
            if pid in signalled:
                self.unreached.append(pid_file.stem)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
                signalled.add(pid)
        deadline = time.monotonic() + 10
        for path, n in zip(log_files, before, strict=True):
            while _count(path) <= n and time.monotonic() < deadline:
                time.sleep(0.01)
        return len(signalled)


def _count(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count(_RELOADED)
    except OSError:
        return 0


def _nats_server_pid(pid_file: Path) -> int | None:
    """The pid in a pid file, if that process is still a nats-server (a pid is reused after exit)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"nats-server" in cmdline else None


# --- the authorization block --------------------------------------------------------------------------


def authorization_block(users: Sequence[User]) -> str:
    """The nats-server `authorization` block for these users (public keys and permissions only)."""
    lines = [
        "# Generated by agentbus from users.json (agentbus auth add | revoke); edits here are overwritten.",
        "authorization {",
        "  users = [",
    ]
    for user in sorted(users, key=lambda u: u.identity.user):
        lines.append(f"    # {user.identity.user}: {user.identity.role}")
        lines.append(f"    {{nkey: {_q(user.public_key)}, permissions: {_permissions(permissions(user.identity))}}}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _permissions(p: Permissions) -> str:
    pub = ", ".join(_q(s) for s in p.publish)
    sub = ", ".join(_q(s) for s in p.subscribe)
    text = f"{{publish: {{allow: [{pub}]}}, subscribe: {{allow: [{sub}]}}"
    if p.allow_responses:
        text += ", allow_responses: true"
    return text + "}"


def _q(value: str) -> str:
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError(f"cannot quote {value!r} for the server's configuration")
    return f'"{value}"'


# --- local contexts -----------------------------------------------------------------------------------


def context_dir() -> Path:
    override = os.environ.get("AGENTBUS_CONTEXT_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "agentbus" / "contexts"


def _context_file(url: str) -> Path | None:
    first = url.split(",")[0].strip()
    parsed = urllib.parse.urlparse(first if "//" in first else f"nats://{first}")
    try:
        port = parsed.port or 4222
    except ValueError:
        return None
    host = parsed.hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        host = "local"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        return None
    return context_dir() / f"{host}-{port}.toml"


@dataclass(frozen=True)
class Context:
    url: str
    creds: str
    tls_ca: str = ""


def write_context(url: str, creds: Path, tls_ca: str = "") -> Path | None:
    """Remember, for this OS user, which credentials reach the server at `url`."""
    path = _context_file(url)
    if path is None:
        return None
    text = (
        "# written by `agentbus server` / `agentbus up`: the CLI uses these credentials for this server\n"
        f"url = {json.dumps(url)}\ncreds = {json.dumps(str(creds.resolve()))}\ntls_ca = {json.dumps(tls_ca)}\n"
    )
    write_private(path, text)
    return path


def find_context(url: str) -> Context | None:
    path = _context_file(url)
    if path is None or not path.exists():
        return None
    try:
        data = tomllib.loads(path.read_text())
        return Context(url=str(data["url"]), creds=str(data["creds"]), tls_ca=str(data.get("tls_ca", "")))
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return None


def parse_grants(values: Sequence[str], what: str) -> tuple[str, ...]:
    for v in values:
        if not valid_token(v):
            raise UsageError(f"{what} {v!r} must be 1-64 characters of letters, digits, '-' or '_'")
    return tuple(dict.fromkeys(values))


def identity(name: str, role: str, *, prefix: str, sessions: Sequence[str], pools: Sequence[str]) -> Identity:
    """A new user's identity from `auth add` options, refusing grants that the role cannot use."""
    if role not in ROLES:
        raise UsageError(f"role {role!r} must be one of {', '.join(ROLES)}")
    if sessions and role not in ("codriver", "observer"):
        raise UsageError(f"--session grants apply to codriver and observer, not {role}")
    if pools and role != "agent":
        raise UsageError(f"--pool grants apply to agent, not {role}")
    try:
        r: Role = role  # type: ignore[assignment,unused-ignore]
        return Identity(
            user=name,
            role=r,
            prefix=prefix,
            sessions=parse_grants(sessions, "session id"),
            pools=parse_grants(pools, "pool name"),
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
