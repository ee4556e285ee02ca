"""The agent worker: serves one pool's queue, heartbeats into the registry, and runs each session (`run.py`).

The queue message of a session is acked only after the session ended (or was handed on); a
worker that drains hands its sessions back with fresh queue messages, so a deploy costs a
session no delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from opentelemetry.trace import SpanKind

from agentbus import openings, tracing
from agentbus.authority import honoured
from agentbus.bus import Bus, Job
from agentbus.config import DEFAULT_TOOLS
from agentbus.errors import AgentBusError, FencedError
from agentbus.mcp.servers import McpServerSpec
from agentbus.messages import (
    Budget,
    InterruptRequested,
    Routed,
    SessionCreated,
    WorkerInfo,
    decode_event,
    encode,
    kind_of,
)
from agentbus.models import ModelClient, model_from_spec
from agentbus.queues import WorkQueues, WorkSettlement
from agentbus.sandbox import tool_environment
from agentbus.service import Consumer, HandBack, Retry, Service, consume
from agentbus.session import SessionLog
from agentbus.spend import HoldWatch, SpendBatch, SpendLedger
from agentbus.subjects import parse_session_subject, valid_token
from services.agent import repo_workspace
from services.agent.exhausted import ExhaustedWatcher
from services.agent.guards import NO_PROGRESS_TURNS
from services.agent.run import RunContext, SessionRun
from services.agent.signals import Released
from services.agent.tools import Tool, load_tools, schemas, tool_sandbox
from services.agent.transcript import SIGNAL_LEAD_S, Hearing
from services.agent.wake import TimerWatcher, WakeWatcher

_HEARD_KEPT = 4096
_SUBMISSION = frozenset({"session_created", "routed"})
_RUN_END_POLLS = 40  # 2 s
logger = logging.getLogger("agentbus.agent")


def submission(subject: bytes, data: bytes) -> bool:
    """A session's creation or its route on its control channel: every session has both, and every
    agent hears them, so they are dropped as they are read off the connection (`_hear_people`)."""
    parsed = parse_session_subject(subject.decode("utf-8", "replace"))
    return parsed is not None and parsed[1] == "control" and kind_of(data) in _SUBMISSION


if TYPE_CHECKING:
    from services.agent.mcp_tools import McpToolset

DEFAULT_SYSTEM = (
    "You are an agent working inside agentbus. Use the tools to do the task in your session workspace. "
    "Messages marked [message from NAME] come from people watching the session: take them into account. "
    "When the task is done, reply with the final result and no tool call."
)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How one agent process behaves; the CLI builds it from options."""

    pool: str
    model: str
    tools: tuple[str, ...] = DEFAULT_TOOLS
    workdir: Path = Path(".agentbus/work")
    concurrency: int = 4
    max_output_tokens: int = 4096  # of each model call; a session's total is budget.max_tokens
    system: str = DEFAULT_SYSTEM
    ack_wait_s: float = 60.0
    max_deliver: int = 5
    runaway_steps: int = 100  # a safety net for sessions with no budget; budget.max_steps pauses instead
    max_depth: int = 3
    max_children: int = 8  # delegations per session, so a looping model cannot fork without end
    budget: Budget = Budget()  # noqa: RUF009 - frozen. The pool default; a session's own budget overrides it
    no_progress_turns: int = NO_PROGRESS_TURNS
    worker_id: str = field(
        # the random part: containers on the host network share the hostname and often the pid
        default_factory=lambda: (
            os.environ.get("AGENTBUS_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
    )
    heartbeat_s: float = 3.0
    approve: tuple[str, ...] = ()  # tools whose calls wait for a person's approval
    approval_timeout_s: float | None = None
    on_approval_timeout: Literal["deny", "pause"] = "deny"
    allowed_models: tuple[str, ...] = ()  # models a session may name besides `model` (--allow-model)
    # Where tools that run commands (bash, plug-ins that say so) run: "bwrap", or "none" (unconfined).
    sandbox: str = "bwrap"
    network: bool = False  # may those commands reach the network?
    tool_env: tuple[str, ...] = ()  # their environment allow-list: NAME (the agent's value) or NAME=VALUE
    mcp: tuple[McpServerSpec, ...] = ()  # MCP servers whose tools join the list (issue 17, mcp_tools.py)
    # Issue 19: a repository the pool's sessions work on, each in its own worktree on its own branch.
    repo: str | None = None
    base: str | None = None  # the ref branches start from (default: the branch the main checkout is on)
    review: bool = False  # ended sessions wait in the inbox as "ready for review"
    repo_sweep_s: float = 30.0  # how often worktrees of sessions that ended elsewhere are removed


class AgentWorker(Service):
    """Serves one pool: `run()` until `shutdown()` (safe twice); on shutdown, running sessions
    stop at their next step boundary and go back to the queue."""

    def __init__(self, bus: Bus, config: AgentConfig, model: ModelClient | None = None) -> None:
        if not valid_token(config.pool):
            raise AgentBusError(f"pool name {config.pool!r} must be letters, digits, '-' or '_'")
        self.bus = bus
        self.config = config
        self.log = SessionLog(bus)
        self.queues = WorkQueues(self.log)
        self.ledger = SpendLedger(bus)
        self.holds = HoldWatch(self.ledger, config.pool)
        self.spend = SpendBatch(self.ledger, config.pool)
        self.model = model or model_from_spec(config.model)
        self._models: dict[str, ModelClient] = {}
        self.tools: dict[str, Tool] = load_tools(config.tools)
        self.tool_schemas = schemas(self.tools)
        self.tool_env = tool_environment(config.tool_env, os.environ)
        self.sandbox = tool_sandbox(self.tools, config.sandbox)  # probed now: refused here, not mid-session
        # MCP servers (issue 17): their tools are listed when the worker starts serving, into the very
        # dict and list the run context holds
        self.mcp: McpToolset | None = None
        if config.mcp:  # the MCP SDK only where a pool uses it: its import is about 0.5 s of every agent's start
            from services.agent.mcp_tools import McpToolset

            self.mcp = McpToolset(config.mcp, sandbox_mode=config.sandbox, sandbox=self.sandbox, workdir=config.workdir,
                                  network=config.network, tool_env=self.tool_env)  # fmt: skip
        self.repos = repo_workspace.open_repos(  # checked now too: a bad repo or base is one line at start
            config.repo, config.base, review=config.review, workdir=config.workdir, pool=config.pool
        )
        self.consumer = bus.ns.pool_consumer(config.pool, ack_wait_s=config.ack_wait_s, max_deliver=config.max_deliver)
        super().__init__()
        self.sessions: set[str] = set()
        self.served = 0
        self._people_live = Hearing()  # set while people's messages are heard live (`_people`)
        self._heard: dict[str, float] = {}  # sessions not running here that had a signal lately
        self._context = RunContext(
            worker_id=config.worker_id,
            pool=config.pool,
            log=self.log,
            queues=self.queues,
            holds=self.holds,
            spend=self.spend,
            tools=self.tools,
            tool_schemas=self.tool_schemas,
            model_for=self.model_for,
            draining=self._draining,
            system=config.system + (repo_workspace.SYSTEM_NOTE if self.repos else ""),
            max_output_tokens=config.max_output_tokens,
            runaway_steps=config.runaway_steps,
            max_depth=config.max_depth,
            max_children=config.max_children,
            max_deliver=config.max_deliver,
            people_live=self._people_live,
            pool_budget=config.budget,
            no_progress_turns=config.no_progress_turns,
            workdir=config.workdir.resolve(),  # once, not per claim (a session's path is recorded absolute)
            pool_model=self.model.name,
            allowed_models=config.allowed_models,
            approve=frozenset(config.approve),
            sandbox=self.sandbox,
            network=config.network,
            tool_env=self.tool_env,
            approval_timeout_s=config.approval_timeout_s,
            on_approval_timeout=config.on_approval_timeout,
            repo=self.repos,
            work_key=openings.WorkKey(bus),
        )
        self._runs: dict[str, SessionRun] = {}

    def model_for(self, spec: str | None) -> ModelClient:
        """The pool's model, or a per-session one (cost routing), built once per spec."""
        if spec is None or spec == self.model.name:
            return self.model
        if spec not in self._models:
            self._models[spec] = model_from_spec(spec)
        return self._models[spec]

    async def _serve(self) -> None:
        await self.bus.provision()
        if self._context.work_key is not None:
            await self._context.work_key.get()  # now, not on the first session's path
        if self.mcp is not None:
            from services.agent.mcp_tools import add_tools

            add_tools(self.tools, self.tool_schemas, await self.mcp.tools())
        consumer = Consumer(
            spec=self.consumer,
            handle=self._handle,
            settle=WorkSettlement(self.queues, self.config.pool),
            concurrency=self.config.concurrency,
            keep_alive=True,
        )
        exhausted = ExhaustedWatcher(self.bus, self.queues, self.config.pool, self.config.max_deliver)
        wake, timers = WakeWatcher(self.bus, self.queues), TimerWatcher(self.bus, self.queues)
        wake_control = WakeWatcher(self.bus, self.queues, self.bus.ns.wake_control_consumer())
        logger.info("agent %s serving pool %s with %s", self.config.worker_id, self.config.pool, self.model.name)
        try:
            await self._supervise(
                loops=[
                    consume(self.bus, consumer, self._draining),
                    exhausted.run(self._draining),
                    wake.run(self._draining),
                    wake_control.run(self._draining),  # cancels and bad input on people's command channels
                    timers.run(self._draining),
                ],
                daemons=[
                    self._heartbeat(),
                    self._people(),
                    self.holds.run(),
                    self.spend.run(),
                    *repo_workspace.daemons(self.repos, self.log, self.config.repo_sweep_s),
                ],
            )
        finally:
            # A courtesy (the registry's TTL drops the entry anyway): never wait out a failover
            # for it while stopping, as when NATS went away first.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.kv_delete(self.bus.ns.workers_bucket, self.config.worker_id), 2.0)
            if self.mcp is not None:
                await self.mcp.aclose()
            logger.info("agent %s stopped after %d sessions", self.config.worker_id, self.served)

    async def _heartbeat(self) -> None:
        """Announce this worker in the registry; the bucket's TTL forgets it if the beats stop."""
        started = time.time()
        while True:
            info = WorkerInfo(
                worker_id=self.config.worker_id,
                pool=self.config.pool,
                model=self.model.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                container=os.environ.get("AGENTBUS_CONTAINER", ""),
                sessions=tuple(sorted(self.sessions)),
                concurrency=self.config.concurrency,
                started_ts=started,
                heartbeat_ts=time.time(),
                allowed_models=self.config.allowed_models,
                repo=str(self.repos.repo.top) if self.repos else "",
                base=self.repos.base if self.repos else "",
            )
            with contextlib.suppress(Exception):
                await self.bus.kv_put(self.bus.ns.workers_bucket, self.config.worker_id, encode(info))
            await asyncio.sleep(self.config.heartbeat_s)

    async def _people(self) -> None:
        """People's messages to the sessions running here, as live signals (no consumer): an interrupt
        is acted on the moment it arrives, and anything else tells the run to look in the log at its
        next step boundary (`Transcript.nudge`). The log keeps them all; a run between steps sees them."""
        while True:
            try:
                await self._hear_people()
            except Exception as err:
                logger.warning("people's channels not heard live (%s); trying again", err)
            finally:
                self._people_live.clear()  # runs look in the log at every step boundary again
            await asyncio.sleep(1.0)

    async def _hear_people(self) -> None:
        people = self.bus.ns.sessions_people_all()
        async for subject, data in self.bus.listen(people, ready=self._people_live, skip=submission):
            sid, channel, sender = parse_session_subject(subject) or ("", "input", "")
            event = honoured(channel, sender, decode_event(data))  # the subject says who sent it
            if isinstance(event, SessionCreated | Routed):
                # a submission, not steering: a run reads it when it takes the session (it cannot
                # start before it), so it is no reason to look in the stream again at each step
                continue
            run = self._runs.get(sid)
            if run is None:  # not running here yet: a run that starts soon may read the log before it is stored
                self._heard_before_run(sid)
                continue
            run.transcript.nudge()
            if isinstance(event, InterruptRequested):
                logger.info("session %s: interrupted by %s", sid, event.author)
                run.interrupt(event)

    async def _finishes(self, sid: str) -> bool:
        """Whether the run of `sid` here ends within a moment. A wake-up (a child's result, an answer)
        often arrives just as the run it wakes parks: it looked for the news before recording the
        park, and the news came right after. Waiting that moment out spares the wake-up a redelivery
        half an ack wait later."""
        for _ in range(_RUN_END_POLLS):
            await asyncio.sleep(0.05)
            if sid not in self._runs:
                return True
        return False

    def _heard_before_run(self, sid: str) -> None:
        now = time.monotonic()
        self._heard[sid] = now
        if len(self._heard) > _HEARD_KEPT:  # only the last few seconds matter
            recent = sorted(self._heard.items(), key=lambda kv: kv[1])[-(_HEARD_KEPT // 2) :]
            self._heard = {k: t for k, t in recent if now - t < SIGNAL_LEAD_S}  # room for half again

    async def _handle(self, job: Job) -> None:
        """One queue message: run its session to an end or a park (ack), or hand it back (draining)."""
        item = await self.queues.accept(job)
        sid = item.session_id
        if sid in self._runs and not await self._finishes(sid):
            raise Retry(delay=self.config.ack_wait_s / 2)  # this worker is running it: never twice at once
        self.sessions.add(sid)
        attrs = {**tracing.messaging_attrs(job.subject, operation="process"), "agentbus.attempt": job.attempt}
        try:
            with tracing.span(
                f"process {self.config.pool}",
                kind=SpanKind.CONSUMER,
                parent=job.trace_context,
                session_id=sid,
                pool=self.config.pool,
                attributes=attrs,
            ):
                run = SessionRun(self._context, sid, job, item)
                self._runs[sid] = run
                if (heard := self._heard.pop(sid, None)) is not None:
                    run.transcript.nudge(heard)
                outcome = await run.execute()
        except Released:
            outcome = "released"
        except FencedError as err:
            logger.warning("session %s: another agent owns it now (%s); leaving it", sid, err)
            raise Retry(delay=self.config.ack_wait_s) from err
        finally:
            self.sessions.discard(sid)
            self._runs.pop(sid, None)
        if outcome == "released":
            raise HandBack()
        self.served += outcome == "ended"


async def serve(
    bus: Bus,
    config: AgentConfig,
    stop: asyncio.Event,
    *,
    model: ModelClient | None = None,
    started: Callable[[], None] | None = None,
) -> None:
    """Run a worker until `stop` is set, then drain it; `started` is called once the worker is made
    (its model client and tools loaded), before it serves."""
    worker = AgentWorker(bus, config, model)
    if started is not None:
        started()
    runner = asyncio.create_task(worker.run())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        await worker.shutdown()
    waiter.cancel()
    try:
        await runner
    finally:
        for model in (worker.model, *worker._models.values()):
            closer: Callable[[], Awaitable[None]] | None = getattr(model, "aclose", None)
            if closer:
                await closer()
