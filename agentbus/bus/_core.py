"""The connection: connect once or fail clearly, reconnect quietly, retry idempotent requests through a failover."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.client import ServerVersion
from nats.aio.msg import Msg

from agentbus import auth, roles
from agentbus.bus._connection import Connection
from agentbus.bus._errors import TRANSIENT, description
from agentbus.bus._replies import Replies, unanswered
from agentbus.config import Settings
from agentbus.errors import BusError, NatsUnreachable, NotAuthenticated, NotPermitted, UsageError
from agentbus.roles import Identity
from agentbus.subjects import Namespace

logger = logging.getLogger("agentbus.bus")
T = TypeVar("T")


def check_urls(urls: str) -> list[str]:
    """The servers of a comma-separated NATS URL list; a malformed one is a `UsageError` at once."""
    servers = [u.strip() for u in urls.split(",") if u.strip()]
    for server in servers:
        # nats-py reads a bare HOST[:PORT] as nats://HOST[:PORT]
        parsed = urllib.parse.urlparse(server if "//" in server else f"nats://{server}")
        try:
            parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parsed = parsed._replace(netloc="")
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            # a typo is not worth waiting for: fail now, whatever connect_wait_s says
            raise UsageError(f"bad NATS URL {server!r}: expected nats://HOST:PORT (or tls://, ws://, wss://)")
    return servers


class BusCore:
    """The state every part of the bus shares: the connection, JetStream context, settings and names."""

    def __init__(self, nc: NATS, settings: Settings, identity: Identity | None = None) -> None:
        self._nc = nc
        # who this connection is: its user name is the last token of what it says and asks for
        self.identity = identity or Identity(user=auth.local_user_name())
        self._js = nc.jetstream(timeout=settings.publish_timeout_s)
        self.settings = settings
        # JSON escaping can make a prompt up to 6x longer (control characters become \\u00XX).
        self.ns = Namespace(settings.prefix, max_message_bytes=settings.max_prompt_bytes * 6 + 65536)
        self._kv: dict[str, Any] = {}
        self._replies: Replies | None = None  # one subscription for the answers to our requests, made on first use
        self._replies_made = asyncio.Lock()
        self._updating = False
        self._link = _Link()

    @classmethod
    async def connect(cls, settings: Settings, *, name: str = "agentbus") -> Self:
        """Connect, failing fast with `NatsUnreachable` instead of retrying forever; a service
        started beside its server (compose, systemd) sets `connect_wait_s` to keep trying that long."""
        servers = check_urls(settings.nats_url)
        deadline = time.monotonic() + settings.connect_wait_s
        while True:
            try:
                nc, link, identity = await _connect_once(servers, settings, name=name)
            except (NatsUnreachable, NotAuthenticated) as err:
                # a service started beside its server waits for it, and for credentials it makes
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                logger.warning("%s; trying again for up to %.0fs", err, left)
                await asyncio.sleep(min(1.0, left))
                continue
            bus = cls(nc, settings, identity)
            bus._link = link
            return bus

    async def close(self) -> None:
        """Drain (what is on its way is handled, what was sent is flushed), then close for good.

        nats-py's drain refuses while reconnecting, and stops short of closing when its last flush
        fails (the server gone): a bus closed then was left reconnecting for ever."""
        self._link.closing = True
        for step in (self._nc.drain, lambda: asyncio.wait_for(self._nc.close(), 5.0)):
            if self._nc.is_closed:
                break
            try:
                await step()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this close is being cancelled
                # nats-py's close awaits its socket's close waiter, which the lost connection may
                # have cancelled: a CancelledError not meant for us (the client is closed by then)
            except Exception:
                pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def replies(self) -> Replies:
        """The reply subscription, subscribed on first use (it lives as long as the connection)."""
        if self._replies is None:
            async with self._replies_made:  # two first requests at once make one subscription
                if self._replies is None:
                    replies = Replies(self._nc.new_inbox())
                    sub = await self._nc.subscribe(f"{replies.base}.*", future=replies)  # type: ignore[arg-type]
                    if isinstance(self._nc, Connection):
                        self._nc.answer_into(sub._id, replies)
                    self._replies = replies
        return self._replies

    async def ask(self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None) -> Msg:
        """One request and its answer on the shared reply subscription (`Replies`); `TimeoutError`
        when none comes in `timeout` seconds."""
        replies = await self.replies()
        reply, answer = replies.one()
        timer = asyncio.get_running_loop().call_later(timeout, unanswered, answer)
        try:
            await self._nc.publish(subject, data, reply=reply, headers=headers)
            return await answer
        finally:
            timer.cancel()
            replies.close(reply)

    async def ask_together(
        self, requests: list[tuple[str, bytes, dict[str, str]]], timeout: float
    ) -> list[Msg | TimeoutError]:
        """Requests sent back to back, then their answers, in order: one round trip for the lot.
        An answer that does not come in `timeout` seconds is a `TimeoutError` in its place."""
        replies = await self.replies()
        waiting: list[tuple[str, asyncio.Future[Msg]]] = []

        def expire() -> None:
            for _, answer in waiting:
                unanswered(answer)

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            for subject, data, headers in requests:
                reply, answer = replies.one()
                waiting.append((reply, answer))
                await self._nc.publish(subject, data, reply=reply, headers=headers)
            answers: list[Msg | TimeoutError] = []
            for _, answer in waiting:  # every one awaited: none left with an exception nobody read
                try:
                    answers.append(await answer)
                except TimeoutError as err:
                    answers.append(err)
            return answers
        finally:
            timer.cancel()
            for reply, _ in waiting:
                replies.close(reply)

    @property
    def connected_url(self) -> str:
        url = self._nc.connected_url
        return url.geturl() if url else self.settings.nats_url

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def fences_on_wildcards(self) -> bool:
        """Whether the server takes `Nats-Expected-Last-Subject-Sequence-Subject` (2.11+), so a publish
        can be fenced on a wildcard (a whole session); an older one ignores the header and fences on
        the published subject instead."""
        server = self._nc._current_server
        return _fences_on_wildcards(server.server_version if server is not None else "")

    @property
    def one_server(self) -> bool:
        """Whether the connected server stores its streams alone: JetStream on, no cluster (so every
        stream is R1, and no leaf node forwards to one elsewhere). nats-server 2.15 checks
        `Nats-Expected-Last-Msg-Id` on a replicated stream only as each replica applies the entry,
        and a mismatch there halts the stream for good (a "critical write error", again after a
        restart): a publish that expects a last message id is for one server only."""
        info = self._nc._server_info
        return self._nc.is_connected and bool(info.get("jetstream")) and not info.get("cluster")

    @property
    def reconnects(self) -> int:
        """How often the connection came back after a loss: live signals sent meanwhile were missed."""
        return self._link.reconnects

    def refused(self, subject: str, detail: str = "") -> NotPermitted:
        """The one-line refusal for `subject`, naming the action (from the permissions table) and the role."""
        action = roles.action_for(subject, self.identity.user) or f"use {subject}"
        # services log at INFO, so who was refused what is in their log; the CLI prints one line
        logger.info("refused: %s (%s %s): %s", action, self.identity.role, self.identity.user, subject)
        return NotPermitted(
            action, user=self.identity.user, role=self.identity.role, detail=detail or f"the server refused {subject}"
        )

    async def _refusable(self, subject: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one request; if the server reports a permissions violation for `subject` (or, for a
        stream or bucket name, any API subject naming it) before the answer, raise `NotPermitted`
        at once instead of waiting out a request that will never be answered.

        The hot path (every publish) pays for a set insertion only: the violation callback cancels
        the waiting task itself, and the cancellation is turned into the refusal here."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task under asyncio
            return await call()
        watch = _Watch(subject.lower(), task)
        self._link.watches.add(watch)
        try:
            return await call()
        except asyncio.CancelledError:
            if not watch.refused:
                raise
            task.uncancel()
            raise self.refused(subject) from None
        finally:
            self._link.watches.discard(watch)

    async def _through_failover(self, what: str, call: Callable[[], Awaitable[T]], *, refusal: str | None = None) -> T:
        """Run an idempotent JetStream request, retrying through a failover (a timeout, no
        responders or 503 while a cluster elects a new leader or the client reconnects) for up
        to `failover_s`. Publishes qualify: the retry carries the same Nats-Msg-Id, which the server deduplicates.
        It checks a fence (expected last subject sequence) first, though: a fenced retry whose
        first attempt was stored is refused as fenced, and `SessionWriter` recognises its own."""
        deadline = time.monotonic() + self.settings.failover_s
        delay = 0.1
        while True:
            try:
                return await (self._refusable(refusal, call) if refusal else call())
            except TRANSIENT as err:
                if time.monotonic() + delay > deadline:
                    raise BusError(
                        f"{what}: JetStream did not answer within {self.settings.failover_s:.0f}s ({description(err)})"
                    ) from err
                logger.debug("%s: %s; retrying", what, type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


@functools.lru_cache(maxsize=8)
def _fences_on_wildcards(version: str) -> bool:
    """Per version string: nats-py parses it with a regex at every look, and routes look per session."""
    try:
        parsed = ServerVersion(version)
        return (parsed.major, parsed.minor) >= (2, 11)
    except (ValueError, TypeError):
        return False


class _Watch:
    """A request in flight that a refusal of `hint` ends (its task is cancelled, then told why)."""

    __slots__ = ("hint", "refused", "task")

    def __init__(self, hint: str, task: asyncio.Task[Any]) -> None:
        self.hint = hint
        self.task = task
        self.refused = False


class _Link:
    """What the connection callbacks know: closed for good, closing on purpose, when it was lost,
    and the subjects the server refused (it says so asynchronously, on the error callback)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.closing = False
        self.lost_at = 0.0
        self.reconnects = 0
        self.violations: list[str] = []
        self.auth_error = ""
        self.established = False
        self.pending: set[asyncio.Future[None]] = set()
        self.watches: set[_Watch] = set()

    def violated(self, subject: str) -> None:
        self.violations.append(subject)
        del self.violations[:-1000]  # only recent ones matter
        for watch in list(self.watches):
            if watch.hint in subject and not watch.refused and not watch.task.done():
                watch.refused = True
                watch.task.cancel()


_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.IGNORECASE)


def credentials_for(settings: Settings) -> tuple[auth.Credentials | None, str]:
    """The credentials to connect with (`--creds`/AGENTBUS_CREDS, else the local context of the
    server this user started) and the CA bundle for TLS."""
    tls_ca = settings.tls_ca
    if settings.creds:
        return auth.read_creds(settings.creds), tls_ca
    if "@" in settings.nats_url.split(",")[0]:
        return None, tls_ca  # NATS's own URL-embedded user:password or token
    context = auth.find_context(settings.nats_url)
    if context is None:
        return None, tls_ca
    try:
        return auth.read_creds(context.creds), tls_ca or context.tls_ca
    except NotAuthenticated:
        return None, tls_ca  # a context left by a server whose store is gone: try without


def _options(settings: Settings, creds: auth.Credentials | None, tls_ca: str) -> tuple[dict[str, Any], Identity]:
    opts: dict[str, Any] = {}
    if creds is None:
        first = urllib.parse.urlparse(settings.nats_url.split(",")[0].strip())
        named = re.sub(r"[^A-Za-z0-9_-]", "_", first.username or "")[:64]
        identity = Identity(user=named or auth.local_user_name())
    else:
        identity = creds.identity
        if creds.nats_creds is not None:
            opts["user_credentials"] = str(creds.nats_creds)
        else:
            opts["nkeys_seed_str"] = creds.seed
        if identity.role is not None:
            opts["inbox_prefix"] = identity.inbox_prefix
        if identity.role not in (None, "admin") and identity.prefix != settings.prefix:
            raise UsageError(
                f"the credentials of {identity.user} are for namespace {identity.prefix}, not {settings.prefix}"
                f" (--prefix {identity.prefix})"
            )
    if tls_ca or any(u.strip().startswith("tls://") for u in settings.nats_url.split(",")):
        try:
            opts["tls"] = ssl.create_default_context(cafile=tls_ca or None)
        except (OSError, ssl.SSLError) as err:
            raise UsageError(f"cannot use {tls_ca} as the TLS CA bundle: {err}") from err
    return opts, identity


async def _connect_once(servers: list[str], settings: Settings, *, name: str) -> tuple[NATS, _Link, Identity]:
    url = settings.nats_url
    link = _Link()
    creds, tls_ca = credentials_for(settings)
    options, identity = _options(settings, creds, tls_ca)
    options.update(connect_timeout=settings.connect_timeout_s, reconnect_time_wait=0.2)

    async def on_error(err: Exception) -> None:
        # each failure is reported where it surfaces, as one line; refusals are matched there
        found = _VIOLATION.search(str(err))
        if found:
            link.violated(found.group(2).lower())
            logger.debug("server refused %s to %s for %s", found.group(1), found.group(2), identity.user)
        elif "authorization violation" in str(err).lower() or isinstance(err, nats.errors.AuthorizationError):
            link.auth_error = str(err)
            if link.established and not link.closing:
                # refused on reconnecting: revoked. Retrying forever would only hide that.
                logger.error("the server at %s no longer accepts %s (revoked?); closing", url, identity.user)
                link.closing = True
                link.pending.add(asyncio.ensure_future(nc.close()))

    async def on_closed() -> None:
        link.closed.set()

    async def on_disconnected() -> None:
        if not link.closing and not link.closed.is_set():
            link.lost_at = time.monotonic()
            logger.warning("lost the connection to NATS at %s; reconnecting", url)

    async def on_reconnected() -> None:
        link.reconnects += 1
        gone = time.monotonic() - link.lost_at if link.lost_at else 0.0
        where = nc.connected_url.geturl() if nc.connected_url else url
        logger.warning("reconnected to NATS at %s after %.1fs", where, gone)

    try:
        # nats-py retries a first connect forever when reconnects are allowed; we want a
        # clear failure now, and reconnects only once a connection has worked.
        nc = Connection()
        await nc.connect(
            servers,
            name=name,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # the server-pool loop otherwise tries 60 times
            drain_timeout=5,
            error_cb=on_error,
            closed_cb=on_closed,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            **options,
        )
    except Exception as err:  # nats-py raises bare errors for bad URLs, OSError or its own for the rest
        # a first attempt that fails is not closed by nats-py: its socket would leak
        link.closing = True  # not a lost connection: never one
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)  # a failed TLS handshake can leave close() waiting
        text = str(err) or type(err).__name__
        if "authorization violation" in text.lower() or isinstance(err, nats.errors.AuthorizationError):
            raise _not_authenticated(url, creds) from err
        if isinstance(err, ssl.SSLError) or "certificate" in text.lower():
            hint = "AGENTBUS_TLS_CA names the CA that signed the server's certificate"
            raise NatsUnreachable(url, f"TLS: {text} ({hint})") from err
        raise NatsUnreachable(url, text) from err
    link.established = True
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc, link, identity


def _not_authenticated(url: str, creds: auth.Credentials | None) -> NotAuthenticated:
    if creds is None:
        return NotAuthenticated(
            f"the server at {url} requires credentials: give --creds FILE or set AGENTBUS_CREDS"
            " (the server's admin makes them with `agentbus auth add NAME --role ROLE`)"
        )
    return NotAuthenticated(
        f"the server at {url} refused the credentials of {creds.identity.user} ({creds.path}): unknown there or revoked"
    )
