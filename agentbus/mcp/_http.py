"""`agentbus mcp --http`: Streamable HTTP, where every request proves who sends it with a bearer token.

Each token maps to an agentbus credentials file the server holds, and that request runs on a NATS
connection made with those credentials: NATS enforces the caller's role, never the server's. With
no tokens file the server has one caller, the credentials it was started with (as over stdio), and
makes a random token for it, kept in a file only its user can read. The SDK's bearer middleware
checks the token (401 otherwise) and binds each MCP session to the token that opened it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from agentbus.client import Client
from agentbus.config import Settings
from agentbus.errors import NotAuthenticated, UsageError
from agentbus.mcp._connect import open_client


@dataclass(frozen=True)
class Caller:
    """One holder of a bearer token, and the credentials its calls use."""

    name: str
    token_sha256: bytes
    creds: str


def load_tokens(path: str | Path) -> list[Caller]:
    """A tokens file: `[callers.NAME]` tables with `token` (or `token_sha256`, hex) and `creds`.

    The file holds secrets: refused unless only its owner may read it (mode 0600), like an ssh key.
    """
    where = Path(path)
    try:
        mode = where.stat().st_mode
        data = tomllib.loads(where.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"tokens file {where}: {err}") from err
    if mode & 0o077:
        raise UsageError(f"tokens file {where} may be read by others (mode {mode & 0o777:o}); chmod 600 it")
    callers = []
    for name, raw in (data.get("callers") or {}).items():
        here = f"tokens file {where}, caller {name}"
        if not isinstance(raw, dict) or not raw.get("creds") or not (raw.get("token") or raw.get("token_sha256")):
            raise UsageError(f"{here}: needs `creds` and `token` (or `token_sha256`)")
        digest = bytes.fromhex(raw["token_sha256"]) if raw.get("token_sha256") else _digest(str(raw["token"]))
        creds = Path(str(raw["creds"])).expanduser()
        if not creds.is_absolute():
            creds = where.parent / creds
        callers.append(Caller(name=str(name), token_sha256=digest, creds=str(creds)))
    if not callers:
        raise UsageError(f"tokens file {where}: no [callers.NAME] table")
    return callers


def own_token(settings: Settings, token_file: Path) -> tuple[Caller, str]:
    """The one caller of a server without a tokens file: its own credentials, and a fresh token
    written (0600) to `token_file`, which is what a person passes as `Authorization: Bearer`."""
    token = secrets.token_urlsafe(32)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(token_file, 0o600)  # an existing file keeps its mode through O_CREAT
    return Caller(name="owner", token_sha256=_digest(token), creds=settings.creds), token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The SDK's `TokenVerifier`, and `Callers`: one agentbus client per caller, made on first use."""

    def __init__(self, callers: list[Caller], settings: Settings) -> None:
        self.callers = callers
        self.settings = settings
        self._clients: dict[str, Client] = {}

    async def verify_token(self, token: str) -> AccessToken | None:
        digest = _digest(token)
        found = None
        for caller in self.callers:  # every entry compared, in constant time: no early exit to time
            if hmac.compare_digest(digest, caller.token_sha256):
                found = caller
        return AccessToken(token="", client_id=found.name, scopes=[]) if found else None

    async def client_for(self, ctx: ServerRequestContext[Any, Any]) -> Client:
        request: Any = ctx.request
        user = request.scope.get("user") if request is not None else None
        if not isinstance(user, AuthenticatedUser):
            raise NotAuthenticated("no bearer token on this request")
        name = user.access_token.client_id
        if name not in self._clients:
            caller = next(c for c in self.callers if c.name == name)
            self._clients[name] = await open_client(
                self.settings.with_(creds=caller.creds), name=f"agentbus-mcp-{name}"
            )
        return self._clients[name]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.bus.close()
        self._clients.clear()


def auth_settings(host: str, port: int) -> AuthSettings:
    """Bearer tokens checked by this server alone: no OAuth server, no metadata routes."""
    return AuthSettings(issuer_url=f"http://{_url_host(host)}:{port}", resource_server_url=None)  # type: ignore[arg-type]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
