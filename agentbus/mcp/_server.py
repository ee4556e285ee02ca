"""The MCP server: tools and resources on the low-level `mcp` Server, each call run as its caller.

Who the caller is comes from `Callers`: over stdio the process's own credentials; over HTTP the
bearer token's (`_http.py`). Every call goes to NATS on that caller's connection, so the server's
own permissions never stand in for theirs: NATS refuses what the caller's role does not allow.

Resource subscriptions, in both protocol eras: `resources/subscribe` (handshake era, Claude Code)
and `subscriptions/listen` (2026-07-28). Either way a watcher taps the session as the caller and
sends `resources/updated` for each new record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from mcp.server import Server, ServerRequestContext
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    CallToolResult,
    EmptyResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    ListToolsResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    TextContent,
    TextResourceContents,
    Tool,
    ToolAnnotations,
    UnsubscribeRequestParams,
)

from agentbus.client import Client
from agentbus.errors import AgentBusError, NoSuchSession, UsageError
from agentbus.mcp._tools import BY_NAME, INSTRUCTIONS, TOOLS, ToolSpec, event_data
from agentbus.messages import to_builtins
from agentbus.subjects import valid_token

logger = logging.getLogger("agentbus.mcp")

SESSION_URI = "agentbus://session/{id}"
INBOX_URI = "agentbus://inbox"
RECENT_EVENTS = 20
ERROR_NAMES = {1: "error", 2: "usage", 3: "no_such_session", 4: "nats_unavailable", 5: "unsuccessful",
               6: "not_permitted", 130: "interrupted"}  # fmt: skip


class Callers(Protocol):
    """Who is calling, as a connected agentbus client acting with their credentials."""

    async def client_for(self, ctx: ServerRequestContext[Any, Any]) -> Client: ...

    async def aclose(self) -> None: ...


class OwnCredentials:
    """Every call acts as this process (`--creds`, `AGENTBUS_CREDS`, the local context): stdio, where
    the caller is whoever started the process."""

    def __init__(self, connect: Callable[[], Awaitable[Client]]) -> None:
        self._connect = connect
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def client_for(self, ctx: ServerRequestContext[Any, Any]) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await self._connect()
            return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.bus.close()
            self._client = None


def tool_error(err: AgentBusError) -> CallToolResult:
    """A tool error with the meaning (and code) of the CLI's exit code for the same failure."""
    code = err.exit_code
    data = {"error": {"code": ERROR_NAMES.get(code, "error"), "exit_code": code, "message": str(err)}}
    return CallToolResult(
        content=[TextContent(text=f"agentbus: {err} (exit code {code})")], structured_content=data, is_error=True
    )


def _tool(spec: ToolSpec) -> Tool:
    return Tool(
        name=spec.name,
        title=spec.title,
        description=spec.description,
        input_schema=spec.input_schema(),
        annotations=ToolAnnotations(
            title=spec.title,
            read_only_hint=spec.read_only,
            destructive_hint=spec.destructive,
            idempotent_hint=spec.read_only,
            open_world_hint=False,
        ),
    )


def session_id_of(uri: str) -> str:
    """The session of an `agentbus://session/<id>` URI (UsageError for anything else)."""
    prefix = SESSION_URI.removesuffix("{id}")
    sid = uri.removeprefix(prefix) if uri.startswith(prefix) else ""
    if not valid_token(sid):
        raise UsageError(f"not an agentbus resource: {uri!r} (expected {SESSION_URI} or {INBOX_URI})")
    return sid


class AgentbusMCP:
    """The server's handlers and the watchers behind resource subscriptions."""

    def __init__(self, callers: Callers) -> None:
        self.callers = callers
        self.events = InMemorySubscriptionBus()
        self._listen = ListenHandler(self.events)
        self._watchers: dict[tuple[int, str], asyncio.Task[None]] = {}
        self.server: Server[Any] = Server(
            "agentbus",
            version=_version(),
            title="agentbus",
            instructions=INSTRUCTIONS,
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_templates,
            on_read_resource=self.read_resource,
            on_subscribe_resource=self.subscribe,
            on_unsubscribe_resource=self.unsubscribe,
            on_subscriptions_listen=self.listen,
        )

    async def aclose(self) -> None:
        self._listen.close()
        for task in list(self._watchers.values()):
            task.cancel()
        for task in list(self._watchers.values()):
            with contextlib.suppress(BaseException):
                await task
        self._watchers.clear()
        await self.callers.aclose()

    # --- tools ------------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[_tool(spec) for spec in TOOLS])

    async def call_tool(self, ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        spec = BY_NAME.get(params.name)
        if spec is None:
            return tool_error(UsageError(f"unknown tool {params.name!r}; the tools are {', '.join(BY_NAME)}"))
        try:
            try:
                args = msgspec.convert(params.arguments or {}, spec.args)
            except msgspec.ValidationError as err:
                raise UsageError(f"{spec.name}: {err}") from None
            client = await self.callers.client_for(ctx)
            reply = await spec.handler(client, args)
        except AgentBusError as err:
            logger.info("tool %s refused: %s", spec.name, err)
            return tool_error(err)
        except Exception as err:  # a bug here must not take the server (and the caller's other work) down
            logger.exception("tool %s failed", spec.name)
            return tool_error(AgentBusError(f"{spec.name} failed: {type(err).__name__}: {err}"))
        return CallToolResult(content=[TextContent(text=reply.text)], structured_content=reply.data)

    # --- resources --------------------------------------------------------------------------

    async def list_resources(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListResourcesResult:
        inbox = Resource(uri=INBOX_URI, name="inbox", title="Sessions that need a person",
                         description="The attention inbox: sessions waiting for an answer, an approval or a "
                         "resume, or that failed. Subscribe to hear when it changes.",
                         mime_type="application/json")  # fmt: skip
        return ListResourcesResult(resources=[inbox])

    async def list_templates(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListResourceTemplatesResult:
        template = ResourceTemplate(uri_template=SESSION_URI, name="session", title="A session",
                                    description="A session's state and its most recent events. Subscribe to be "
                                    "notified each time the session moves (a step, a message, its end).",
                                    mime_type="application/json")  # fmt: skip
        return ListResourceTemplatesResult(resource_templates=[template])

    async def read_resource(
        self, ctx: ServerRequestContext[Any], params: ReadResourceRequestParams
    ) -> ReadResourceResult:
        uri = str(params.uri)
        try:
            client = await self.callers.client_for(ctx)
            body = await self._inbox(client) if uri == INBOX_URI else await self._session(client, session_id_of(uri))
        except AgentBusError as err:
            raise _mcp_error(err, uri) from None
        text = json.dumps(body, ensure_ascii=False)
        return ReadResourceResult(contents=[TextResourceContents(uri=uri, text=text, mime_type="application/json")])

    async def _session(self, client: Client, sid: str) -> dict[str, Any]:
        state = await client.state(sid)
        if not state.last_seq:
            raise NoSuchSession(sid)
        start = max(state.last_seq - 4 * RECENT_EVENTS, 1)  # stream sequences: other sessions interleave
        records = (await client.log.read(sid, from_seq=start))[-RECENT_EVENTS:]
        return {"state": to_builtins(state), "recent_events": [event_data(r) for r in records]}

    @staticmethod
    async def _inbox(client: Client) -> dict[str, Any]:
        return {"items": [to_builtins(i) async for i in client.inbox()]}

    # --- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, ctx: ServerRequestContext[Any], params: SubscribeRequestParams) -> EmptyResult:
        """Handshake era: watch the resource as this caller; `resources/updated` on this connection."""
        uri = str(params.uri)
        key = (id(ctx.session), uri)
        if key not in self._watchers:
            session = ctx.session
            self._watchers[key] = await self._watch(ctx, uri, lambda: session.send_resource_updated(uri), key)
        return EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams) -> EmptyResult:
        task = self._watchers.pop((id(ctx.session), str(params.uri)), None)
        if task is not None:
            task.cancel()
        return EmptyResult()

    async def listen(
        self, ctx: ServerRequestContext[Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        """2026-07-28: start a watcher for each URI asked for (refused if the caller may not read it),
        then serve the stream; the watchers end with it."""
        watchers = []
        try:
            for uri in params.notifications.resource_subscriptions or ():
                watchers.append(await self._watch(ctx, uri, self._publisher(uri)))
            return await self._listen(ctx, params)
        finally:
            for task in watchers:
                task.cancel()

    def _publisher(self, uri: str) -> Callable[[], Awaitable[None]]:
        return lambda: self.events.publish(ResourceUpdated(uri=uri))

    async def _watch(
        self, ctx: ServerRequestContext[Any], uri: str, notify: Callable[[], Awaitable[None]],
        key: tuple[int, str] | None = None,
    ) -> asyncio.Task[None]:  # fmt: skip
        """Check that the caller may read `uri` (an MCP error if not), then follow it in a task."""
        try:
            client = await self.callers.client_for(ctx)
            if uri == INBOX_URI:
                follow = self._follow_inbox(client, notify)
            else:
                sid = session_id_of(uri)
                state = await client.state(sid)  # refused here, in the caller's face, if it may not read it
                if not state.last_seq:
                    raise NoSuchSession(sid)
                follow = self._follow_session(client, sid, state.last_seq + 1, notify)
        except AgentBusError as err:
            raise _mcp_error(err, uri) from None
        return asyncio.create_task(self._guarded(follow, uri, key), name=f"agentbus-mcp-watch {uri}")

    async def _guarded(self, follow: Awaitable[None], uri: str, key: tuple[int, str] | None) -> None:
        try:
            await follow
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the client went away (a closed stream), or the bus did
            logger.info("stopped watching %s: %s", uri, err)
        finally:
            if key is not None and self._watchers.get(key) is asyncio.current_task():
                del self._watchers[key]

    @staticmethod
    async def _follow_session(client: Client, sid: str, start: int, notify: Callable[[], Awaitable[None]]) -> None:
        async for _ in client.tap(sid, start=start):
            await notify()

    @staticmethod
    async def _follow_inbox(client: Client, notify: Callable[[], Awaitable[None]]) -> None:
        async for _ in client.inbox(follow=True):
            await notify()


def _mcp_error(err: AgentBusError, uri: str) -> MCPError:
    data = {"uri": uri, "exit_code": err.exit_code, "code": ERROR_NAMES.get(err.exit_code, "error")}
    return MCPError(code=INVALID_PARAMS, message=f"agentbus: {err} (exit code {err.exit_code})", data=data)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agentbus-runtime")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
