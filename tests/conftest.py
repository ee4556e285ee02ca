"""Shared fixtures: one real nats-server per test session, with authorization on, a fresh namespace per test.

Tests connect as the server's admin unless they ask for another role (`as_user`). The admin's
credentials are also in AGENTBUS_CREDS, so `agentbus ...` subprocesses act as the person who
started the server does; local contexts go to a temporary directory, never the user's home.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

import agentbus
from agentbus.auth import identity
from agentbus.config import Settings
from agentbus.server import NatsServer

_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _private_contexts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Local contexts (what `agentbus server` leaves for the CLI) in a directory of this run only."""
    old = os.environ.get("AGENTBUS_CONTEXT_DIR")
    os.environ["AGENTBUS_CONTEXT_DIR"] = str(tmp_path_factory.mktemp("contexts"))
    yield
    if old is None:
        os.environ.pop("AGENTBUS_CONTEXT_DIR", None)
    else:
        os.environ["AGENTBUS_CONTEXT_DIR"] = old


_LEFT_OPEN: list[str] = []  # connections a test never closed (named in the summary)


@pytest.fixture(scope="session", autouse=True)
async def _no_connection_outlives_the_run() -> AsyncIterator[None]:
    """Every NATS connection the run made is closed before the run's event loop is: one a test
    left open would reconnect once the server stops, and the loop's closing then waits on its
    reconnect task (a run once ended in a 120 s timeout that way). Those left are named."""
    made: weakref.WeakSet[NatsClient] = weakref.WeakSet()
    init = NatsClient.__init__

    def registered(self: NatsClient) -> None:
        init(self)
        made.add(self)

    NatsClient.__init__ = registered  # type: ignore[method-assign]
    try:
        yield
    finally:
        NatsClient.__init__ = init  # type: ignore[method-assign]
        for nc in list(made):
            if nc.is_closed or nc._current_server is None:  # closed, or never connected
                continue
            _LEFT_OPEN.append(str(nc.options.get("name") or "unnamed"))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LEFT_OPEN:
        names = ", ".join(sorted(set(_LEFT_OPEN)))
        terminalreporter.write_line(
            f"{len(_LEFT_OPEN)} NATS connection(s) left open by tests, closed at the end: {names}"
        )


@pytest.fixture(scope="session")
def nats_server(_private_contexts: None) -> Iterator[NatsServer]:
    """A real nats-server on a free 127.0.0.1 port with a temp store, shared by the whole run.
    Only its users may connect; the first is `admin`."""
    with NatsServer(admin="admin") as server:
        assert server.admin_creds is not None
        old = os.environ.get("AGENTBUS_CREDS")
        os.environ["AGENTBUS_CREDS"] = str(server.admin_creds)
        try:
            yield server
        finally:
            if old is None:
                os.environ.pop("AGENTBUS_CREDS", None)
            else:
                os.environ["AGENTBUS_CREDS"] = old


@pytest.fixture
def prefix() -> str:
    """A namespace no other test uses, so tests share the server but never each other's streams."""
    return f"t{os.getpid()}x{next(_counter)}"


@pytest.fixture
def settings(nats_server: NatsServer, prefix: str) -> Settings:
    assert nats_server.admin_creds is not None
    return Settings(nats_url=nats_server.url, prefix=prefix, creds=str(nats_server.admin_creds))


AsUser = Callable[..., Settings]


@pytest.fixture
def as_user(nats_server: NatsServer, settings: Settings, tmp_path: Path) -> AsUser:
    """Make a user of this test's namespace on the shared server and return settings that connect
    as it: `as_user("alice", "observer", sessions=[sid])`. Names get the namespace as a suffix
    (users are global to the server)."""
    assert nats_server.auth is not None
    store = nats_server.auth

    def make(name: str, role: str, *, sessions: Sequence[str] = (), pools: Sequence[str] = ()) -> Settings:
        user = f"{name}-{settings.prefix}"
        ident = identity(user, role, prefix=settings.prefix, sessions=sessions, pools=pools)
        path = store.add(ident, tmp_path / f"{user}.creds")
        nats_server.reload()
        return settings.with_(creds=str(path))

    return make


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[agentbus.Client]:
    async with agentbus.connect(settings=settings) as c:
        yield c
