"""The spend ledger: dollars spent per pool, and the holds a dollar ceiling puts on a pool.

Agents add each model call's cost right after recording the call (compare-and-set, so
concurrent agents never lose an update). The supervisor compares the totals with the pools
file's ceilings and sets or clears one hold per pool. An agent reads its pool's hold before
every model call and, while one is set, pauses the session exactly as a session budget does.
The totals are close, not exact: a call whose cost could not be added (an agent crash right
after recording it, or the ledger unreachable) is missing, and an update retried after a lost
reply may count twice. Calls in flight when a hold is set finish. The session logs stay the
exact record of every call and its cost.
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
