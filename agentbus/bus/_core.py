"""The connection: connect once or fail clearly, reconnect quietly, retry idempotent requests through a failover."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS

from agentbus.bus._errors import TRANSIENT
from agentbus.config import Settings
from agentbus.errors import BusError, NatsUnreachable, UsageError
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

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=settings.publish_timeout_s)
        self.settings = settings
        # JSON escaping can make a prompt up to 6x longer (control characters become \\u00XX).
        self.ns = Namespace(settings.prefix, max_message_bytes=settings.max_prompt_bytes * 6 + 65536)
        self._kv: dict[str, Any] = {}
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
                nc, link = await _connect_once(servers, settings, name=name)
            except NatsUnreachable as err:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                logger.warning("%s; trying again for up to %.0fs", err, left)
                await asyncio.sleep(min(1.0, left))
                continue
            bus = cls(nc, settings)
            bus._link = link
            return bus

    async def close(self) -> None:
        self._link.closing = True
        if not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def connected_url(self) -> str:
        url = self._nc.connected_url
        return url.geturl() if url else self.settings.nats_url

    async def _through_failover(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent JetStream request, retrying through a failover (a timeout, no
        responders or 503 while a cluster elects a new leader or the client reconnects) for up
        to `failover_s`. Publishes qualify: the retry carries the same Nats-Msg-Id, and the
        server checks duplicates before the fence, so a stored first attempt is not refused."""
        deadline = time.monotonic() + self.settings.failover_s
        delay = 0.1
        while True:
            try:
                return await call()
            except TRANSIENT as err:
                if time.monotonic() + delay > deadline:
                    raise BusError(
                        f"{what}: JetStream did not answer within {self.settings.failover_s:.0f}s"
                        f" ({type(err).__name__})"
                    ) from err
                logger.debug("%s: %s; retrying", what, type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


class _Link:
    """What the connection callbacks know: closed for good, closing on purpose, when it was lost."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.closing = False
        self.lost_at = 0.0


async def _connect_once(servers: list[str], settings: Settings, *, name: str) -> tuple[NATS, _Link]:
    url = settings.nats_url
    link = _Link()

    async def on_error(_: Exception) -> None:
        return None  # each failure is reported where it surfaces, as one line

    async def on_closed() -> None:
        link.closed.set()

    async def on_disconnected() -> None:
        if not link.closing and not link.closed.is_set():
            link.lost_at = time.monotonic()
            logger.warning("lost the connection to NATS at %s; reconnecting", url)

    async def on_reconnected() -> None:
        gone = time.monotonic() - link.lost_at if link.lost_at else 0.0
        where = nc.connected_url.geturl() if nc.connected_url else url
        logger.warning("reconnected to NATS at %s after %.1fs", where, gone)

    try:
        # nats-py retries a first connect forever when reconnects are allowed; we want a
        # clear failure now, and reconnects only once a connection has worked.
        nc = await nats.connect(
            servers,
            name=name,
            connect_timeout=settings.connect_timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # the server-pool loop otherwise tries 60 times
            reconnect_time_wait=0.2,
            drain_timeout=5,
            error_cb=on_error,
            closed_cb=on_closed,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except Exception as err:  # nats-py raises bare errors for bad URLs, OSError or its own for the rest
        raise NatsUnreachable(url, str(err) or type(err).__name__) from err
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.5
    return nc, link
