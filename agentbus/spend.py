"""The spend ledger: dollars spent per pool, and the holds a dollar ceiling puts on a pool.

Agents add their model calls' costs once a second (`SpendBatch`: compare-and-set, so
concurrent agents never lose an update). The supervisor compares the totals with the pools
file's ceilings and sets or clears one hold per pool. An agent checks its pool's hold before
every model call (`HoldWatch`: read again only when the server says the key changed) and, while
one is set, pauses the session exactly as a session budget does. The totals are close, not
exact: costs an agent had not flushed when it died, or could not add (the ledger unreachable),
are missing, and an update retried after a lost reply may count twice. Calls in flight when
a hold is set finish. The session logs stay the exact record of every call and its cost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec

from agentbus.bus import Bus
from agentbus.errors import BusError, NotPermitted
from agentbus.messages import Hold, PoolSpend, encode

log = logging.getLogger("agentbus.spend")
_SETTLE_S = 2.0  # after a hold changes, reads are not cached for this long (see HoldWatch)
_ATTEMPTS = 50  # compare-and-set rounds before giving up; contention is a handful of agents
_Change = Callable[[PoolSpend], PoolSpend]
_T = TypeVar("_T")


def _spend_key(pool: str) -> str:
    return f"pool.{pool}"


def _hold_key(pool: str) -> str:
    return f"hold.{pool}"


class SpendLedger:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.bucket = bus.ns.spend_bucket

    async def add(self, pool: str, usd: float, calls: int = 1) -> PoolSpend:
        """Add a call's cost to the pool's total."""
        return await self._update(pool, lambda cur: PoolSpend(
            pool=pool, usd=cur.usd + usd, calls=cur.calls + calls, since_ts=cur.since_ts or time.time(),
            updated_ts=time.time(),
        ))  # fmt: skip

    async def reset(self, pool: str) -> PoolSpend:
        """Count the pool's spend from zero (a new billing period) and lift its hold now; a
        supervisor puts it back on its next look if the fleet as a whole is still over."""
        now = time.time()
        fresh = await self._update(pool, lambda _: PoolSpend(pool=pool, since_ts=now, updated_ts=now))
        try:
            await self.clear_hold(pool)
        except NotPermitted:
            # holds are the supervisor's (and admins'): it lifts this one at its next look, now
            # that the pool is under its ceiling again
            log.info("pool %s: spend reset; the supervisor lifts its hold", pool)
        return fresh

    async def _update(self, pool: str, change: _Change) -> PoolSpend:
        key = _spend_key(pool)
        for attempt in range(_ATTEMPTS):
            got = await self.bus.kv_get(self.bucket, key)
            current = _decode(got[0], PoolSpend, PoolSpend(pool=pool)) if got else PoolSpend(pool=pool)
            new = change(current)
            if await self.bus.kv_put_if(self.bucket, key, msgspec.json.encode(new), got[1] if got else None):
                return new
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise BusError(f"spend of pool {pool}: {_ATTEMPTS} conflicting updates in a row; not recorded")

    async def snapshot(self) -> tuple[dict[str, PoolSpend], dict[str, Hold]]:
        """Every pool's total and every hold, from one read of the bucket."""
        totals: dict[str, PoolSpend] = {}
        holds: dict[str, Hold] = {}
        for key, raw in (await self.bus.kv_values(self.bucket)).items():
            kind, _, pool = key.partition(".")
            if kind == "pool":
                totals[pool] = _decode(raw, PoolSpend, PoolSpend(pool=pool))
            elif kind == "hold":
                holds[pool] = _decode(raw, Hold, _unreadable(pool, raw))
        return totals, holds

    async def hold(self, pool: str) -> Hold | None:
        got = await self.bus.kv_get(self.bucket, _hold_key(pool))
        if not got or not got[0]:
            return None
        return _decode(got[0], Hold, _unreadable(pool, got[0]))

    async def set_hold(self, pool: str, hold: Hold) -> None:
        await self.bus.kv_put(self.bucket, _hold_key(pool), encode(hold))

    async def clear_hold(self, pool: str) -> None:
        await self.bus.kv_delete(self.bucket, _hold_key(pool))


def _unreadable(pool: str, raw: bytes) -> Hold:
    # a hold nobody can read still holds: stopping spend is the safe side of a ceiling
    return Hold(limit="hold", detail=f"unreadable hold on pool {pool}: {raw[:200]!r}")


def _decode(raw: bytes, kind: type[_T], fallback: _T) -> _T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.MsgspecError:
        return fallback


class HoldWatch:
    """A pool's hold as an agent checks it before every model call, without a request per call.

    The key is read once, and again only when the server said it changed (a core subscription to
    the key's subject hears every put and delete), when the connection was lost and regained
    since, or when the last read is `max_age_s` old. Until the subscription is up (or if the
    server refuses it), every check reads the key.
    """

    def __init__(self, ledger: SpendLedger, pool: str, *, max_age_s: float = 30.0) -> None:
        self.ledger = ledger
        self.pool = pool
        self.max_age_s = max_age_s
        self.live = asyncio.Event()
        self._changes = 0
        self._changed_at = float("-inf")
        self._read: tuple[int, int, float, Hold | None] | None = None  # changes, reconnects, when, hold

    async def run(self) -> None:
        """Hear the key change until cancelled (a daemon of the agent)."""
        subject = f"$KV.{self.ledger.bucket}.{_hold_key(self.pool)}"
        while True:
            try:
                async for _ in self.ledger.bus.listen(subject, ready=self.live):
                    self._changes += 1
                    self._changed_at = time.monotonic()
            except Exception as err:
                log.warning("pool %s: hold changes not heard (%s); trying again", self.pool, err)
            finally:
                self.live.clear()
                self._read = None
            await asyncio.sleep(1.0)

    async def hold(self) -> Hold | None:
        read, bus = self._read, self.ledger.bus
        if (
            read is not None
            and self.live.is_set()
            and read[:2] == (self._changes, bus.reconnects)
            and time.monotonic() - read[2] < self.max_age_s
        ):
            return read[3]
        changes, reconnects, started = self._changes, bus.reconnects, time.monotonic()
        # not kept: a read made before the subscription was up (it may have missed a change), or
        # right after a change (a replica serving the read may not have stored it yet)
        keep = self.live.is_set() and started - self._changed_at > _SETTLE_S
        hold = await self.ledger.hold(self.pool)
        self._read = (changes, reconnects, started, hold) if keep else None
        return hold


_LAST_FLUSH_S = 2.0  # what a stopping agent gives its last spend update


class SpendBatch:
    """An agent's model-call costs, added to its pool's total at most once every `every_s`: one
    compare-and-set for many calls instead of one per call. A flush that fails is kept for the
    next; what an agent that dies had not flushed yet is missing from the total, like any lost
    update (module docstring). The session logs have every cost."""

    def __init__(self, ledger: SpendLedger, pool: str, *, every_s: float = 1.0) -> None:
        self.ledger = ledger
        self.pool = pool
        self.every_s = every_s
        self._usd = 0.0
        self._calls = 0
        self._due = asyncio.Event()

    def add(self, usd: float) -> None:
        self._usd += usd
        self._calls += 1
        self._due.set()

    async def run(self) -> None:
        """Flush what came in, at most once every `every_s`, until cancelled; then flush once more.

        A flush under way when the agent stops is let finish, not cut: cut after the server took
        the update but before its answer came, it put its calls back, and the last flush added them
        a second time."""
        flushing: asyncio.Future[None] | None = None
        try:
            while True:
                await self._due.wait()
                await asyncio.sleep(self.every_s)
                flushing = asyncio.ensure_future(self.flush())
                try:
                    await asyncio.shield(flushing)
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    log.warning("pool %s: spend not updated yet (%s); trying again", self.pool, err)
                flushing = None
        finally:
            if flushing is not None:
                await asyncio.wait({flushing}, timeout=_LAST_FLUSH_S)
                if flushing.done() and not flushing.cancelled():
                    flushing.exception()  # its calls are back in the batch if it failed: flushed below
            if self._calls:
                await self._last_flush()

    async def _last_flush(self) -> None:
        # Bounded without waiting for the flush to give up: a shutdown must never hang on it
        # (wait_for would wait for a cancelled request to finish cancelling).
        usd, calls = self._usd, self._calls
        last = asyncio.ensure_future(self.flush())
        try:
            done, _ = await asyncio.wait({last}, timeout=_LAST_FLUSH_S)
        finally:
            if not last.done():
                last.cancel()
        if done and not last.cancelled() and last.exception() is None:
            return
        log.warning("pool %s: $%.4f of %d calls not added to its total", self.pool, usd, calls)

    async def flush(self) -> None:
        usd, calls = self._usd, self._calls
        self._usd, self._calls = 0.0, 0
        self._due.clear()
        if not calls:
            return
        try:
            await self.ledger.add(self.pool, usd, calls)
        except BaseException:  # any failure, a cancel too: kept for the next flush
            self._usd, self._calls = self._usd + usd, self._calls + calls
            self._due.set()
            raise
