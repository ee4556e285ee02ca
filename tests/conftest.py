"""Shared fixtures: one real nats-server per test session, a fresh namespace per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest

import agentbus
from agentbus.config import Settings
from agentbus.server import NatsServer

_counter = itertools.count()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server on a free 127.0.0.1 port with a temp store, shared by the whole run."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A namespace no other test uses, so tests share the server but never each other's streams."""
    return f"t{os.getpid()}x{next(_counter)}"


@pytest.fixture
def settings(nats_server: NatsServer, prefix: str) -> Settings:
    return Settings(nats_url=nats_server.url, prefix=prefix)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[agentbus.Client]:
    async with agentbus.connect(settings=settings) as c:
        yield c
