"""Running the web view: uvicorn on one address, the app from `create_app`, the URL said once it listens."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

import click
import uvicorn

from agentbus.config import Settings
from agentbus.errors import ServerInUse
from agentbus.web.app import WebConfig, create_app

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one); a taken port is `ServerInUse` (exit 4)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServerInUse(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def config_for(settings: Settings, host: str, allowed_hosts: Sequence[str], pools_file: str | None) -> WebConfig:
    names = [*_LOOPBACK, *allowed_hosts]
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    return WebConfig(settings=settings, allowed_hosts=tuple(dict.fromkeys(names)), pools_file=pools_file)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    allowed_hosts: Sequence[str] = (),
    pools_file: str | None = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM; open streams are ended after 2 s so shutdown never hangs."""
    sock = bind(host, port)
    app = create_app(config_for(settings, host, allowed_hosts, pools_file))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, proxy_headers=False,
                            server_header=False)  # fmt: skip
    server = uvicorn.Server(config)
    click.echo(f"web view on {url_of(sock)} (NATS {settings.nats_url}); log in with an agentbus credentials file")
    asyncio.run(server.serve(sockets=[sock]))
