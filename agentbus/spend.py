"""The spend ledger: dollars spent per pool, and the holds a dollar ceiling puts on a pool.

Agents add each model call's cost right after recording the call (compare-and-set, so
concurrent agents never lose an update). The supervisor compares the totals with the pools
file's ceilings and sets or clears one hold per pool. An agent reads its pool's hold before
every model call and, while one is set, pauses the session exactly as a session budget does.
The ledger can undercount by one call per agent crash (between recording a call and adding
its cost); the session logs stay the exact record.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from agentbus.bus import Bus
from agentbus.errors import BusError
from agentbus.messages import Hold, PoolSpend, encode

_ATTEMPTS = 50  # compare-and-set rounds before giving up; contention is a handful of agents
_Change = Callable[[PoolSpend], PoolSpend]


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
        """Start the pool's count again from zero (a new billing period, a raised limit)."""
        now = time.time()
        return await self._update(pool, lambda _: PoolSpend(pool=pool, since_ts=now, updated_ts=now))

    async def _update(self, pool: str, change: _Change) -> PoolSpend:
        key = _spend_key(pool)
        for _ in range(_ATTEMPTS):
            got = await self.bus.kv_get(self.bucket, key)
            current = _decode(got[0], pool) if got else PoolSpend(pool=pool)
            new = change(current)
            if await self.bus.kv_put_if(self.bucket, key, msgspec.json.encode(new), got[1] if got else None):
                return new
        raise BusError(f"spend of pool {pool}: {_ATTEMPTS} concurrent updates in a row; not recorded")

    async def totals(self) -> dict[str, PoolSpend]:
        values = await self.bus.kv_values(self.bucket)
        return {
            k.removeprefix("pool."): _decode(v, k.removeprefix("pool."))
            for k, v in values.items()
            if k.startswith("pool.")
        }

    async def hold(self, pool: str) -> Hold | None:
        got = await self.bus.kv_get(self.bucket, _hold_key(pool))
        if not got or not got[0]:
            return None
        try:
            return msgspec.json.decode(got[0], type=Hold)
        except msgspec.MsgspecError:
            return Hold(limit="hold", detail=f"unreadable hold on pool {pool}: {got[0][:200]!r}")

    async def holds(self) -> dict[str, Hold]:
        values = await self.bus.kv_values(self.bucket)
        out = {}
        for key, raw in values.items():
            if key.startswith("hold."):
                try:
                    out[key.removeprefix("hold.")] = msgspec.json.decode(raw, type=Hold)
                except msgspec.MsgspecError:
                    out[key.removeprefix("hold.")] = Hold(limit="hold", detail="unreadable hold")
        return out

    async def set_hold(self, pool: str, hold: Hold) -> None:
        await self.bus.kv_put(self.bucket, _hold_key(pool), encode(hold))

    async def clear_hold(self, pool: str) -> None:
        await self.bus.kv_delete(self.bucket, _hold_key(pool))


def _decode(raw: bytes, pool: str) -> PoolSpend:
    try:
        return msgspec.json.decode(raw, type=PoolSpend)
    except msgspec.MsgspecError:
        return PoolSpend(pool=pool)  # an unreadable total counts from zero rather than blocking every call
