"""The supervisor: keeps each pool between its min and max, replaces dead workers, grants extra ones.

It decides from three things only: its own worker handles (alive or not), the registry's
heartbeats, and the pool's queue (messages waiting). At start it adopts the workers a
previous supervisor left running: containers by their labels, processes on this host by
the registry's pid and their environment. A worker that dies
leaves its task unacked; JetStream hands it to another agent after the ack wait, and that
agent resumes the session from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field

import msgspec

from agentbus import tracing
from agentbus.bus import Bus
from agentbus.errors import AgentBusError
from agentbus.messages import Hold, ScaleReply, ScaleRequest, SupervisorInfo, WorkerInfo, encode
from agentbus.service import Service
from agentbus.spend import SpendLedger
from agentbus.subjects import WORKER_TTL_S
from services.supervisor.pools import Fleet, PoolSpec
from services.supervisor.spawner import Spawner, WorkerHandle

log = logging.getLogger("agentbus.supervisor")
_REQUEST_PATIENCE_S = 4.0  # under the requester's 5 s timeout (Bus.request)
ANNOUNCE_EVERY_S = 3.0  # like an agent's heartbeat; the bucket's TTL (15 s) drops a silent supervisor


@dataclass
class PoolState:
    spec: PoolSpec
    workers: list[WorkerHandle] = field(default_factory=list)
    crashes: int = 0
    next_spawn: float = 0.0
    idle_since: float | None = None


class Supervisor(Service):
    """`run()` until `shutdown()`; shutdown drains every worker it started."""

    def __init__(
        self, bus: Bus, fleet: Fleet, spawner: Spawner, *, tick_s: float = 0.5, stale_after_s: float = WORKER_TTL_S
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.spawner = spawner
        self.tick_s = tick_s
        self.pools = {name: PoolState(spec) for name, spec in fleet.pools.items()}
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(2)
        super().__init__()
        self.replaced = 0
        self.stale_after_s = stale_after_s
        self._started: dict[str, float] = {}
        self.ledger = SpendLedger(bus)
        # one decision at a time: a scale request served mid-tick must not change a pool's
        # worker list while the tick is looking at it
        self._lock = asyncio.Lock()
        self.failed_ticks = 0
        self.ticks = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self.spawn_failures = 0
        self.started = 0
        self._holding = True  # until the first look: a hold left by an earlier supervisor may be stale
        self.supervisor_id = re.sub(r"[^A-Za-z0-9_-]", "_", f"{socket.gethostname()}-{os.getpid()}-{self._tag}")
        self._announced = 0.0
        self._dead: set[str] = set()  # workers seen dead whose registry entries have not expired yet
        self._since = time.time()

    @property
    def total(self) -> int:
        """Workers counted against the fleet cap, those still draining after a scale-down included."""
        return sum(len(p.workers) for p in self.pools.values()) + len(self._retiring)

    async def _serve(self) -> None:
        await self.bus.provision()
        for pool in self.pools.values():
            # with the pool's ack wait, as its agents ask for it: the first creator's limits stand
            await self.bus.ensure_consumer(self.bus.ns.pool_consumer(pool.spec.name, ack_wait_s=pool.spec.ack_wait_s))
        for handle in await self.spawner.adopt(self.fleet.pools, await self._registry()):
            self.pools[handle.pool].workers.append(handle)
            self._started[handle.worker_id] = time.time()  # a silent adoptee gets the usual grace
        stop_serving = await self.bus.serve(self.bus.ns.scale_requests(), self._on_scale_request)
        log.info("supervisor managing %s (fleet cap %d)", ", ".join(self.pools), self.fleet.max_workers)
        try:
            while not self._draining.is_set():
                async with self._lock:
                    ok = await self._tick()
                self.ticks += ok
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._draining.wait(), self.tick_s)
        finally:
            await stop_serving()
            async with self._lock:  # a scale request still being served finishes first, then sees _draining
                workers = [w for p in self.pools.values() for w in p.workers]
            log.info("supervisor stopping %d workers (they hand their sessions back)", len(workers))
            await asyncio.gather(*(w.stop() for w in workers), *self._retiring, return_exceptions=True)
            with contextlib.suppress(Exception):  # bounded: with NATS gone the TTL drops it anyway
                await asyncio.wait_for(self.bus.kv_delete(self.bus.ns.supervisors_bucket, self.supervisor_id), 2.0)

    async def _tick(self) -> bool:
        """One look at everything; each part that fails is logged and retried on the next tick
        (NATS failing over, the engine restarting): draining the fleet over it would be worse."""
        ok = True
        beats: dict[str, float] | None = None
        serving: set[str] | None = None  # pools with a live agent in the registry, anyone's
        try:
            registry = await self._registry()
            beats = {info.worker_id: info.heartbeat_ts for info in registry}
            self._dead &= set(beats)  # forget a dead worker once the registry has too
            serving = {info.pool for info in registry if info.worker_id not in self._dead}
        except Exception:
            ok = False
            log.exception("supervisor: cannot read the registry; trying again")
        try:
            await self._enforce_ceilings()
        except Exception:
            ok = False
            log.exception("supervisor: cannot check the dollar ceilings; trying again")
        try:
            await self._announce()
        except Exception:
            ok = False
            log.exception("supervisor: cannot announce the pools it serves; trying again")
        for pool in self.pools.values():
            try:
                if beats is not None:
                    await self._kill_silent(pool, beats)
                await self._reconcile(pool, beats, serving)
            except Exception:
                ok = False
                log.exception("supervisor: pool %s: look failed; trying again", pool.spec.name)
        self.failed_ticks += not ok
        return ok

    async def _enforce_ceilings(self) -> None:
        """Hold a pool over its own or the fleet's dollar ceiling (its agents pause sessions before
        the next model call); lift the hold once the spend is under again (reset, or a raised ceiling)."""
        pools_with_ceiling = any(p.spec.ceiling_usd is not None for p in self.pools.values())
        if self.fleet.ceiling_usd is None and not pools_with_ceiling and not self._holding:
            return
        totals, holds = await self.ledger.snapshot()
        fleet_spent = sum(t.usd for t in totals.values())
        held = False
        for name, pool in self.pools.items():
            spent = totals[name].usd if name in totals else 0.0
            ceiling = pool.spec.ceiling_usd
            want: Hold | None = None
            if ceiling is not None and spent >= ceiling:
                detail = f"pool {name} has spent ${spent:.4f} of its ${ceiling:.2f} ceiling"
                want = Hold(limit="pool_ceiling_usd", detail=detail, set_ts=time.time())
            elif self.fleet.ceiling_usd is not None and fleet_spent >= self.fleet.ceiling_usd:
                detail = f"the fleet has spent ${fleet_spent:.4f} of its ${self.fleet.ceiling_usd:.2f} ceiling"
                want = Hold(limit="fleet_ceiling_usd", detail=detail, set_ts=time.time())
            have = holds.get(name)
            held = held or want is not None
            if want is not None and (have is None or have.limit != want.limit):
                log.warning("pool %s on hold: %s; its sessions pause before their next model call", name, want.detail)
                await self.ledger.set_hold(name, want)
            elif want is None and have is not None:
                log.info("pool %s: hold lifted (%s)", name, f"${spent:.4f} spent")
                await self.ledger.clear_hold(name)
        self._holding = held

    async def _announce(self) -> None:
        """Heartbeat into the supervisors bucket, naming the pools it may start workers in (max > 0),
        so `agentbus pools` and `agentbus submit` can tell a pool that will be served from one that won't."""
        now = time.time()
        if now - self._announced < ANNOUNCE_EVERY_S:
            return
        served = tuple(name for name, pool in self.pools.items() if pool.spec.max > 0)
        info = SupervisorInfo(
            supervisor_id=self.supervisor_id, pools=served, host=socket.gethostname(), pid=os.getpid(),
            started_ts=self._since, heartbeat_ts=now,
        )  # fmt: skip
        await self.bus.kv_put(self.bus.ns.supervisors_bucket, self.supervisor_id, encode(info))
        self._announced = now

    async def _registry(self) -> list[WorkerInfo]:
        values = await self.bus.kv_values(self.bus.ns.workers_bucket)
        infos = []
        for raw in values.values():
            with contextlib.suppress(msgspec.MsgspecError):
                infos.append(msgspec.json.decode(raw, type=WorkerInfo))
        return infos

    async def _kill_silent(self, pool: PoolState, beats: dict[str, float]) -> None:
        """A worker alive as a process but silent on the bus (hung, partitioned) is killed and replaced."""
        now = time.time()
        for w in pool.workers:
            started = self._started.get(w.worker_id, now)
            last = beats.get(w.worker_id, started)
            if now - max(last, started) > self.stale_after_s and await w.alive():
                log.warning("pool %s: %s silent for %.0fs; killing it", pool.spec.name, w.worker_id, now - last)
                await w.kill()

    async def _reconcile(
        self, pool: PoolState, beats: dict[str, float] | None = None, serving: set[str] | None = None
    ) -> None:
        now = time.monotonic()
        workers = list(pool.workers)
        living = await asyncio.gather(*(w.alive() for w in workers))
        dead = [w for w, up in zip(workers, living, strict=True) if not up]
        if dead:
            pool.workers = [w for w in pool.workers if w not in dead]
            self._dead |= {w.worker_id for w in dead}
            await asyncio.gather(*(w.reap() for w in dead))
            pool.crashes += len(dead)
            pool.next_spawn = now + min(2.0 ** (pool.crashes - 1), 30.0) * 0.5
            self.replaced += len(dead)
            log.warning(
                "pool %s: %s died; replacing with backoff", pool.spec.name, ", ".join(w.worker_id for w in dead)
            )
        waiting, in_flight = await self.bus.consumer_backlog(self.bus.ns.pool_consumer(pool.spec.name))
        if in_flight and serving is not None and pool.spec.name not in serving:
            # Tasks held by workers that died (none of the pool is left in the registry) come back
            # only when an agent pulls: in a pool with min = 0 they would wait forever. They wait.
            waiting += in_flight
        size = len(pool.workers)
        tracing.queue_depth.set(waiting, {tracing.POOL: pool.spec.name})
        tracing.workers.set(size, {tracing.POOL: pool.spec.name})
        # Workers started but not yet in the registry will take tasks in a moment: count their
        # slots against the backlog, or one waiting task would start a worker every tick.
        starting = sum(1 for w in pool.workers if beats is not None and w.worker_id not in beats)
        unserved = waiting - starting * pool.spec.concurrency
        if size < pool.spec.min or (unserved > 0 and size < pool.spec.max):
            pool.idle_since = None
            if now >= pool.next_spawn and self.total < self.fleet.max_workers:
                try:
                    await self._spawn(pool)
                except AgentBusError as err:
                    pool.crashes += 1
                    pool.next_spawn = now + min(2.0 ** (pool.crashes - 1), 30.0) * 0.5
                    self.spawn_failures += 1
                    log.error("pool %s: cannot start a worker: %s", pool.spec.name, err)
        elif waiting == 0 and in_flight == 0 and size > pool.spec.min:
            pool.idle_since = pool.idle_since or now
            if now - pool.idle_since >= pool.spec.idle_s:
                victim = pool.workers.pop()
                log.info("pool %s idle for %.0fs: stopping %s", pool.spec.name, pool.spec.idle_s, victim.worker_id)
                # in the background: a draining agent may take its ack wait, and the lock is held
                retiring = asyncio.create_task(self._retire(victim))
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
                pool.idle_since = now
        else:
            pool.idle_since = None
        if pool.workers and now > pool.next_spawn + 60:
            pool.crashes = 0  # a quiet minute forgives earlier crashes

    async def _retire(self, worker: WorkerHandle) -> None:
        try:
            await worker.stop()
        except Exception:
            log.exception("stopping %s failed; it may still be running", worker.worker_id)

    async def _spawn(self, pool: PoolState) -> WorkerHandle:
        worker_id = f"{pool.spec.name}-{self._tag}-{next(self._ids)}"
        attrs = {"agentbus.worker_id": worker_id, "agentbus.spawner": pool.spec.spawner}
        with tracing.span(f"spawn {pool.spec.name}", pool=pool.spec.name, attributes=attrs):
            handle = await self.spawner.spawn(pool.spec, worker_id)
        self._started[worker_id] = time.time()
        self.started += 1
        pool.workers.append(handle)
        log.info("pool %s: started %s (%d/%d)", pool.spec.name, worker_id, len(pool.workers), pool.spec.max)
        return handle

    async def _on_scale_request(self, data: bytes) -> bytes:
        try:
            req = msgspec.json.decode(data, type=ScaleRequest)
        except msgspec.MsgspecError as err:
            return encode(ScaleReply(granted=0, reason=f"malformed request: {err}"))
        pool = self.pools.get(req.pool)
        if pool is None:
            return encode(ScaleReply(granted=0, reason=f"no pool {req.pool!r}; pools: {', '.join(self.pools)}"))
        asked = time.monotonic()
        async with self._lock:
            if self._draining.is_set():
                return encode(ScaleReply(granted=0, reason="the supervisor is stopping"))
            if time.monotonic() - asked > _REQUEST_PATIENCE_S:
                # the asker has given up waiting for this reply; starting workers now would let a
                # retried request be granted twice
                return encode(ScaleReply(granted=0, reason="the supervisor was busy; ask again"))
            if time.monotonic() < pool.next_spawn:
                return encode(ScaleReply(granted=0, reason=f"pool {req.pool} is backing off after failed starts"))
            room = min(pool.spec.max - len(pool.workers), self.fleet.max_workers - self.total)
            granted = max(0, min(req.count, room))
            for started in range(granted):
                try:
                    await self._spawn(pool)
                except AgentBusError as err:
                    return encode(ScaleReply(granted=started, reason=f"cannot start a worker: {err}"))
        if granted < req.count:
            why = f"pool {req.pool} is at {len(pool.workers)} of max {pool.spec.max}" if room == granted else ""
            why = why or f"fleet cap {self.fleet.max_workers} reached"
            return encode(ScaleReply(granted=granted, reason=why))
        return encode(ScaleReply(granted=granted, reason="granted"))
