"""Who is logged in: a session cookie maps to one person's own NATS connection, made with their credentials.

The credentials file crosses the browser once, in the login request. The server connects to NATS
with it (through a file readable only by this process, removed as soon as the connection is made;
the seed then lives only in the connection, which needs it to reconnect) and keeps nothing else
of it. The browser keeps an opaque random token in an HttpOnly, SameSite=Strict cookie; the server
keeps only the token's hash, the connection and a CSRF token per login. Everything the person does
goes over their own connection, so NATS enforces their role: the web server itself holds no
credentials and can do nothing on the bus that its logged-in users could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from agentbus.auth import read_creds
from agentbus.bus import Bus
from agentbus.client import Client
from agentbus.config import Settings
from agentbus.errors import NotAuthenticated, UsageError
from agentbus.roles import Identity

logger = logging.getLogger("agentbus.web")

COOKIE = "agentbus_web"
MAX_CREDENTIALS_BYTES = 16 * 1024
_SEQ_INDEXES = 8  # sessions per login whose sequence lists are kept for paging


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Login:
    """One logged-in person: their connection, identity and CSRF token."""

    client: Client
    identity: Identity
    csrf: str
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    streams: set[asyncio.Event] = field(default_factory=set)  # set one to end that stream
    # per session, the stream sequences of its records (kept by the live stream, for "load earlier")
    seq_index: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)

    def index(self, session_id: str, seqs: list[int]) -> None:
        self.seq_index[session_id] = seqs
        self.seq_index.move_to_end(session_id)
        while len(self.seq_index) > _SEQ_INDEXES:
            self.seq_index.popitem(last=False)

    def drop_streams(self) -> None:
        for stop in list(self.streams):
            stop.set()


class Logins:
    """Logged-in people, by the hash of their cookie's token; idle ones expire."""

    def __init__(self, settings: Settings, *, idle_s: float = 12 * 3600, max_logins: int = 256) -> None:
        self.settings = settings
        self.idle_s = idle_s
        self.max_logins = max_logins
        self._by_digest: dict[str, Login] = {}

    async def login(self, credentials: str) -> tuple[str, Login]:
        """Connect as the credentials' user; returns the cookie token and the login."""
        if len(credentials.encode()) > MAX_CREDENTIALS_BYTES:
            raise UsageError("that is not a credentials file (too long)")
        await self.expire()
        if len(self._by_digest) >= self.max_logins:
            raise UsageError("too many people are logged in; try again later")
        scratch = Path(tempfile.mkdtemp(prefix="agentbus-web-"))  # mode 0700
        path = scratch / "login.creds"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(credentials)
            creds = read_creds(path)  # a bad file: NotAuthenticated, before any connection
            if creds.nats_creds is not None:
                raise NotAuthenticated("log in with an agentbus credentials file (from `agentbus auth add`)")
            bus = await Bus.connect(self.settings.with_(creds=str(path)), name=f"agentbus-web {creds.identity.user}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the seed now lives only in the connection
        try:
            await bus.provision(update=False)
        except Exception:
            await bus.close()
            raise
        token = secrets.token_urlsafe(32)
        login = Login(client=Client(bus), identity=bus.identity, csrf=secrets.token_urlsafe(32))
        self._by_digest[_digest(token)] = login
        logger.info("%s (%s) logged in", login.identity.user, login.identity.role)
        return token, login

    def get(self, token: str | None) -> Login | None:
        if not token:
            return None
        login = self._by_digest.get(_digest(token))
        if login is None:
            return None
        now = time.monotonic()
        if now - login.seen > self.idle_s:
            return None  # closed by the next expire()
        login.seen = now
        return login

    async def logout(self, token: str | None) -> None:
        login = self._by_digest.pop(_digest(token), None) if token else None
        if login is not None:
            await self._close(login)

    async def expire(self) -> None:
        now = time.monotonic()
        for digest, login in list(self._by_digest.items()):
            if now - login.seen > self.idle_s:
                del self._by_digest[digest]
                await self._close(login)

    def drop_streams(self) -> None:
        """End every live stream now; each browser reconnects from the last record it saw."""
        for login in self._by_digest.values():
            login.drop_streams()

    async def close(self) -> None:
        logins, self._by_digest = list(self._by_digest.values()), {}
        for login in logins:
            await self._close(login)

    @staticmethod
    async def _close(login: Login) -> None:
        login.drop_streams()
        with contextlib.suppress(Exception):
            await login.client.bus.close()
        logger.info("%s logged out", login.identity.user)
