"""Pool and fleet dollar ceilings: agents add what each call cost to a per-pool ledger, the
supervisor puts a pool over its ceiling on hold, and new work pauses like a session budget
until the spend is reset (or the ceiling raised)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import BudgetExceeded, Hold
from agentbus.spend import SpendLedger
from agentbus.testing import text_response
from services.supervisor.pools import Fleet, PoolSpec, load_pools
from tests.helpers import POOL, PaperSpawner, agent_with_fake, supervising, until


def supervisor(settings: Settings, fleet: Fleet) -> Any:
    return supervising(settings, fleet, PaperSpawner(), tick_s=0.1)


async def _held(client: agentbus.Client) -> bool:
    return POOL in (await client.spend())[1]


async def _free(client: agentbus.Client) -> bool:
    return POOL not in (await client.spend())[1]


@pytest.mark.parametrize("scope", ["pool", "fleet"])
async def test_a_dollar_ceiling_pauses_new_work_until_the_spend_is_reset(
    client: agentbus.Client, settings: Settings, tmp_path: Path, scope: str
) -> None:
    tiny = 1e-9  # the first priced call goes over it
    spec = PoolSpec(name=POOL, model="anthropic:x", min=0, max=1, ceiling_usd=tiny if scope == "pool" else None)
    fleet = Fleet({POOL: spec}, ceiling_usd=tiny if scope == "fleet" else None)
    async with (
        supervisor(settings, fleet),
        agent_with_fake(settings, tmp_path, responder=lambda _: text_response("done")),
    ):
        first = await client.submit("spend a little", pool=POOL)
        assert (await client.wait(first, timeout=30)).status == "completed"
        await until(lambda: _held(client), "the supervisor to hold the pool", timeout=20)
        totals, holds = await client.spend()

        second = await client.submit("more", pool=POOL)
        paused = await client.wait(second, timeout=30)
        pauses = [r.event for r in await client.show(second) if isinstance(r.event, BudgetExceeded)]

        await client.reset_spend(POOL)
        await until(lambda: _free(client), "the hold to be lifted after a reset", timeout=20)
        await client.resume(second)
        resumed = await client.wait(second, timeout=30)

    assert totals[POOL].usd > 0 and totals[POOL].calls == 1
    assert holds[POOL].limit == f"{scope}_ceiling_usd"
    assert paused.status == "paused"
    assert [p.limit for p in pauses] == [f"{scope}_ceiling_usd"]
    assert "ceiling" in pauses[0].detail and "spend --reset" in pauses[0].detail
    assert resumed.status == "completed"


async def test_concurrent_agents_never_lose_a_cost(settings: Settings) -> None:
    async with await Bus.connect(settings) as a, await Bus.connect(settings) as b:
        ledgers = [SpendLedger(a), SpendLedger(b)]
        await asyncio.gather(*(ledgers[i % 2].add("p", 0.25) for i in range(40)))
        total = (await ledgers[0].snapshot())[0]["p"]
    assert (total.usd, total.calls) == (10.0, 40)


async def test_agentbus_spend_shows_the_total_and_the_hold(client: agentbus.Client, settings: Settings) -> None:
    ledger = SpendLedger(client.bus)
    await ledger.add("coder", 1.5)
    base = [sys.executable, "-m", "agentbus.cli", "spend", "--nats", settings.nats_url, "--prefix", settings.prefix]
    out = await asyncio.to_thread(subprocess.run, base, capture_output=True, text=True, check=True)
    assert "coder" in out.stdout and "$1.5000" in out.stdout
    reset = await asyncio.to_thread(
        subprocess.run, [*base, "--reset", "coder"], capture_output=True, text=True, check=True
    )
    assert "reset" in reset.stdout
    assert (await ledger.snapshot())[0]["coder"].usd == 0.0


def test_ceilings_come_from_the_pools_file(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('ceiling_usd = 100\n[pools.a]\nmodel = "scripted:demo"\nceiling_usd = "${T_CEIL:-25.5}"\n')
    fleet = load_pools(path)
    assert (fleet.ceiling_usd, fleet.pools["a"].ceiling_usd) == (100.0, 25.5)


async def test_a_hold_no_ceiling_explains_is_lifted_and_a_reset_lifts_one_at_once(
    client: agentbus.Client, settings: Settings
) -> None:
    ledger = SpendLedger(client.bus)
    await ledger.set_hold(POOL, Hold(limit="fleet_ceiling_usd", detail="left by an earlier supervisor"))
    async with supervisor(settings, Fleet({POOL: PoolSpec(name=POOL, model="scripted:demo", min=0, max=0)})):
        await until(lambda: _free(client), "the supervisor to lift a hold no ceiling explains", timeout=10)
    await ledger.set_hold("elsewhere", Hold(limit="pool_ceiling_usd", detail="a pool no supervisor runs"))
    await client.reset_spend("elsewhere")
    assert "elsewhere" not in (await client.spend())[1]


async def test_an_agent_stopping_during_a_spend_update_counts_its_calls_once() -> None:
    """The update reaches the server, and the agent stops before the answer comes: the calls are
    counted once (they were put back and added again by the last flush)."""
    from agentbus.spend import SpendBatch

    class Ledger:
        def __init__(self) -> None:
            self.total = 0.0
            self.taken = asyncio.Event()

        async def add(self, pool: str, usd: float, calls: int) -> None:
            self.total += usd  # the server applied it ...
            self.taken.set()
            await asyncio.sleep(0.2)  # ... and its answer is on its way

    ledger = Ledger()
    batch = SpendBatch(ledger, "p", every_s=0.01)  # type: ignore[arg-type]
    runner = asyncio.create_task(batch.run())
    batch.add(0.0004)
    await asyncio.wait_for(ledger.taken.wait(), 5)
    runner.cancel()  # the agent stops mid-update
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    assert ledger.total == pytest.approx(0.0004)
