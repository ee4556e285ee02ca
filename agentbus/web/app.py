"""The web view's HTTP server: a Starlette app of static pages, a JSON API and server-sent event streams.

Every request that reads or acts goes over the logged-in person's own NATS connection. The page
hides controls a role cannot use, but nothing here checks a role: a forged request reaches NATS
as that user, and NATS refuses it. Requests that change anything must come from this origin
(Origin, else Referer, must match the Host, which must be one this server answers to) and carry
the login's CSRF token; the session cookie is HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import bisect
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentbus import budget as budgets
from agentbus.config import Settings
from agentbus.errors import AgentBusError, NotAuthenticated, UsageError
from agentbus.messages import Budget
from agentbus.subjects import valid_token
from agentbus.web import reads, streams
from agentbus.web.logins import COOKIE, Login, Logins
from agentbus.web.views import record_view

logger = logging.getLogger("agentbus.web")

STATIC = files("agentbus.web") / "static"
PAGES = ("/", "/sessions", "/fleet", "/login", "/s/{session_id}")
TAIL = 200  # records a fresh session page shows before "load earlier"
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_STATUS = {2: 400, 3: 404, 6: 403}  # exit codes of AgentBusErrors as HTTP statuses
_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]  # fmt: skip


@dataclass
class WebConfig:
    """What the web server needs: where NATS is (each user connects there as themselves), the names
    it answers to, and optionally the pools file whose ceilings the fleet page shows."""

    settings: Settings
    allowed_hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1", "[::1]")
    pools_file: str | None = None
    idle_s: float = 12 * 3600
    tail: int = TAIL


@dataclass
class Web:
    """The app's state: the logins, and the pools file's ceilings."""

    config: WebConfig
    logins: Logins
    ceilings: dict[str, Any] = field(default_factory=dict)


class SecurityHeaders:
    """Adds the security headers to every response, and refuses a request that changes anything
    unless it comes from this origin (CSRF, first line: Origin, else Referer, must match the Host)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_HEADERS]
            await send(message)

        if scope["method"] in _UNSAFE_METHODS and not same_origin(Request(scope)):
            await JSONResponse({"error": "refused: not from this origin"}, status_code=403)(
                scope, receive, with_headers
            )
            return
        await self.app(scope, receive, with_headers)


def same_origin(request: Request) -> bool:
    """Whether the request says it comes from the origin it is addressed to."""
    host = request.headers.get("host", "")
    expected = f"{request.url.scheme}://{host}"
    origin = request.headers.get("origin")
    if origin and origin != "null":
        return hmac.compare_digest(origin, expected)
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        return hmac.compare_digest(f"{parts.scheme}://{parts.netloc}", expected)
    return False


def _web(request: Request) -> Web:
    web: Web = request.app.state.web
    return web


def _json(data: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, media_type="application/json",
                    headers={"cache-control": "no-store"})  # fmt: skip


def _error(err: AgentBusError) -> Response:
    status = 401 if isinstance(err, NotAuthenticated) else _STATUS.get(err.exit_code, 502)
    return _json({"error": str(err)}, status)


Handler = Callable[[Request, Login], Awaitable[Response]]


def logged_in(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The handler gets the request's login; none is a 401. A request that changes anything must also
    carry the login's CSRF token in `X-CSRF-Token` (second line of CSRF defence)."""

    async def endpoint(request: Request) -> Response:
        login = _web(request).logins.get(request.cookies.get(COOKIE))
        if login is None:
            return _json({"error": "not logged in"}, 401)
        if request.method in _UNSAFE_METHODS:
            token = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(token.encode(), login.csrf.encode()):
                return _json({"error": "refused: missing or wrong CSRF token"}, 403)
        try:
            return await handler(request, login)
        except AgentBusError as err:
            return _error(err)
        except ValueError as err:  # a malformed number in the query
            return _json({"error": f"bad request: {err}"}, 400)

    endpoint.__name__ = handler.__name__
    return endpoint


def _session_id(request: Request) -> str:
    sid = str(request.path_params["session_id"])
    if not valid_token(sid):
        raise UsageError(f"session id {sid!r} must be 1-64 characters of letters, digits, '-' or '_'")
    return sid


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise UsageError("send JSON (content-type: application/json)")
    try:
        data = msgspec.json.decode(await request.body())
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as err:
        raise UsageError(f"not JSON: {err}") from err
    if not isinstance(data, dict):
        raise UsageError("send a JSON object")
    return data


def _text(data: dict[str, Any], key: str, limit: int = 100_000) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise UsageError(f"{key} must be a string of at most {limit} characters")
    return value


# --- pages and login ---------------------------------------------------------------------------------


async def page(request: Request) -> Response:
    return FileResponse(str(STATIC / "index.html"), headers={"cache-control": "no-cache"})


def _cookie(response: Response, request: Request, token: str, *, max_age: int | None = None) -> None:
    response.set_cookie(COOKIE, token, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")  # fmt: skip


async def login(request: Request) -> Response:
    """Log in with the text of a credentials file; the seed is not kept once the connection is made."""
    try:
        creds = _text(await _body(request), "credentials", 64 * 1024)
        token, who = await _web(request).logins.login(creds)
    except AgentBusError as err:
        return _error(err)
    response = _json(_me(who))
    _cookie(response, request, token)
    return response


@logged_in
async def logout(request: Request, who: Login) -> Response:
    await _web(request).logins.logout(request.cookies.get(COOKIE))
    response = _json({"ok": True})
    _cookie(response, request, "", max_age=0)
    return response


def _me(who: Login) -> dict[str, Any]:
    ident = who.identity
    return {"user": ident.user, "role": ident.role, "prefix": ident.prefix, "sessions": list(ident.sessions),
            "csrf": who.csrf, "lists_sessions": ident.lists_sessions}  # fmt: skip


@logged_in
async def me(request: Request, who: Login) -> Response:
    return _json(_me(who))


# --- streams and reads -----------------------------------------------------------------------------


def _sse(body: AsyncIterator[bytes]) -> Response:
    return StreamingResponse(body, media_type="text/event-stream; charset=utf-8",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})  # fmt: skip


def _after(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise UsageError("Last-Event-ID (or after) is a stream sequence")
    return int(raw)


@logged_in
async def session_stream(request: Request, who: Login) -> Response:
    sid, after = _session_id(request), _after(request)
    tail = min(max(int(request.query_params.get("tail", _web(request).config.tail) or 1), 1), 5000)
    return _sse(streams.session_stream(who, sid, after=after, tail=tail))


@logged_in
async def watch(request: Request, who: Login) -> Response:
    return _sse(streams.watch_stream(who))


@logged_in
async def records(request: Request, who: Login) -> Response:
    """A page of records before `before` (for "load earlier"), oldest first."""
    sid = _session_id(request)
    before = int(request.query_params.get("before", "0") or 0)
    limit = min(max(int(request.query_params.get("limit", "200") or 200), 1), 1000)
    seqs = who.seq_index.get(sid)
    if seqs is None or (seqs and before > seqs[-1] + 1):
        seqs = [r.seq for r in await who.client.show(sid)]
        who.index(sid, seqs)
    i = bisect.bisect_left(seqs, before)
    lo = max(i - limit, 0)
    found = await who.client.log.read(sid, from_seq=seqs[lo], limit=i - lo) if i > lo else []
    return _json({"records": [record_view(r) for r in found], "earlier": lo})


@logged_in
async def record(request: Request, who: Login) -> Response:
    """One whole record (what "show all" shows)."""
    sid, seq = _session_id(request), int(request.path_params["seq"])
    found = await who.client.log.read(sid, from_seq=seq, limit=1)
    if not found or found[0].seq != seq:
        return _json({"error": f"no record #{seq} in {sid}"}, 404)
    return _json(record_view(found[0], full=True))


@logged_in
async def tree(request: Request, who: Login) -> Response:
    return _json(await reads.tree(who.client, _session_id(request)))


@logged_in
async def approvals(request: Request, who: Login) -> Response:
    return _json({"approvals": await reads.approvals(who.client, _session_id(request))})


@logged_in
async def fleet(request: Request, who: Login) -> Response:
    return _json(await reads.fleet(who.client, _web(request).ceilings))


# --- verbs: each one event in the session's log, written as the logged-in user -------------------------


@logged_in
async def act(request: Request, who: Login) -> Response:
    """say (steer or queue), interrupt, approve (or deny), cancel, resume, dismiss."""
    sid, verb = _session_id(request), str(request.path_params["verb"])
    data = await _body(request)
    client = who.client
    if verb == "say":
        seq = await client.say(sid, _text(data, "text"), queue=bool(data.get("queue")))
    elif verb == "interrupt":
        seq = await client.interrupt(sid, _text(data, "text"))
    elif verb == "approve":
        call = data.get("call_id") or None
        if call is not None and not isinstance(call, str):
            raise UsageError("call_id must be a string")
        seq, _ = await client.approve(sid, call, deny=bool(data.get("deny")), reason=_text(data, "reason", 2000))
    elif verb == "cancel":
        seq = await client.cancel(sid, reason=_text(data, "reason", 2000))
    elif verb == "resume":
        seq = await client.resume(sid, budget=_budget(data.get("budget") or {}))
    elif verb == "dismiss":
        seq = await client.dismiss(sid, note=_text(data, "note", 2000))
    else:
        return _json({"error": f"no verb {verb!r}"}, 404)
    return _json({"seq": seq})


def _budget(raw: object) -> Budget:
    if not isinstance(raw, dict):
        raise UsageError("budget must be an object of limits")
    values = {k: v for k, v in raw.items() if v not in (None, "")}
    return budgets.from_mapping(values, "resume")


def create_app(config: WebConfig) -> Starlette:
    """The web view as an ASGI app; its logins close when it shuts down."""
    web = Web(config=config, logins=Logins(config.settings, idle_s=config.idle_s),
              ceilings=reads.read_ceilings(config.pools_file))  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await web.logins.close()

    routes = [
        *(Route(p, page, methods=["GET", "HEAD"]) for p in PAGES),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/me", me),
        Route("/api/watch", watch),
        Route("/api/fleet", fleet),
        Route("/api/sessions/{session_id}/stream", session_stream),
        Route("/api/sessions/{session_id}/records", records),
        Route("/api/sessions/{session_id}/records/{seq:int}", record),
        Route("/api/sessions/{session_id}/tree", tree),
        Route("/api/sessions/{session_id}/approvals", approvals),
        Route("/api/sessions/{session_id}/{verb}", act, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts)),
            Middleware(SecurityHeaders),
        ],
        lifespan=lifespan,
    )
    app.state.web = web
    return app
