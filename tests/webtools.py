"""Test helpers for the web view: the app served in this process, a browser, a raw HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from starlette.applications import Starlette

from agentbus.config import Settings
from agentbus.web.app import Web, WebConfig, create_app
from agentbus.web.server import bind, url_of

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
CHROMIUM = os.environ.get("AGENTBUS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def browser_missing() -> str:
    """Why no browser test can run here ("" when one can)."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; or set AGENTBUS_CHROMIUM)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; no `playwright install` needed)"
    return ""


@dataclass
class Served:
    """The web view served on a free 127.0.0.1 port by uvicorn, in this event loop."""

    url: str
    app: Starlette

    @property
    def web(self) -> Web:
        web: Web = self.app.state.web
        return web


@contextlib.asynccontextmanager
async def serve(settings: Settings, **config: Any) -> AsyncIterator[Served]:
    """The web view for `settings` (no credentials of its own: every user logs in with theirs)."""
    sock = bind("127.0.0.1", 0)
    app = create_app(WebConfig(settings=settings.with_(creds=""), **config))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert not task.done(), "the web view did not start"
            assert loop.time() < deadline, "the web view did not start in 10 s"
            await asyncio.sleep(0.01)
        yield Served(url=url_of(sock).rstrip("/"), app=app)
    finally:
        app.state.web.logins.drop_streams()
        server.should_exit = True
        await task
        sock.close()


# --- a raw HTTP/1.1 client: what a script (or an attacker's page) can send, cookies and all -----------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def http(
    url: str, method: str = "GET", path: str = "/", *, body: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    """One request on its own connection; the whole reply (not for streams)."""
    host = url.split("//", 1)[1]
    hostname, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(hostname, int(port))
    try:
        data = msgspec.json.encode(body) if body is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {len(data)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    hdrs: dict[str, str] = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = (hdrs[k.strip().lower()] + ", " if k.strip().lower() in hdrs else "") + v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        rest = _unchunk(rest)
    return Reply(int(status_line.split()[1]), hdrs, rest)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


async def sse_events(
    url: str, path: str, *, cookie: str, last_event_id: int | None = None, until: str = "summary"
) -> list[tuple[str | None, str, Any]]:
    """(id, event, data) of one stream's events up to and including the first `until` event."""
    host = url.split("//", 1)[1]
    hostname, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(hostname, int(port))
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n{extra}\r\n".encode())
    await writer.drain()
    events: list[tuple[str | None, str, Any]] = []
    buf = b""
    try:
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n", 1)[0], head
            while not events or events[-1][1] != until:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)  # chunked
                buf += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    fields = dict(
                        line.split(": ", 1) for line in block.decode().splitlines() if ": " in line and line[0] != ":"
                    )
                    if "event" in fields:
                        events.append((fields.get("id"), fields["event"], msgspec.json.decode(fields["data"])))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return events
