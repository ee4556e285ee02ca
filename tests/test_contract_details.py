"""The smaller promises of the contract: a fresh server's streams exist, and the resume message id is as documented."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import BudgetExceeded
from tests.helpers import raw_connect


async def test_agentbus_server_provisions_the_namespace_at_start_so_any_client_finds_the_streams(
    tmp_path: Path,
) -> None:
    store = tmp_path / "nats"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentbus.cli", "server", "--port", "0", "--store-dir", str(store), "--prefix", "fresh",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "AGENTBUS_CREDS": ""},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "nats-server ready on " in ready, ready
        url = ready.split("ready on ", 1)[1].split()[0]
        admin = next((store / "auth").glob("*.creds"))
        # connected without agentbus.connect (which would provision): what a foreign client finds
        async with await Bus.connect(Settings(nats_url=url, creds=str(admin), prefix="fresh")) as bus:
            required = [s.name for s in bus.ns.streams() if not s.optional]
            assert [await bus.stream_exists(name) for name in required] == [True] * len(required)
            assert await bus.stream_exists(f"KV_{bus.ns.state_bucket}")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)


async def test_a_resume_is_queued_under_the_documented_message_id(client: agentbus.Client, settings: Settings) -> None:
    sid = await client.submit("hello", pool="nobody")
    await client.log.append(sid, BudgetExceeded(id="budget-1", limit="max_steps", detail="1 of 1"))

    seq = await client.resume(sid)

    nc = await raw_connect(settings)
    try:
        js = nc.jetstream()
        ns = client.bus.ns
        ids = []
        stored = await client.bus.next_stored(ns.work_stream, ns.work("nobody"))
        while stored is not None:
            msg = await js.get_msg(ns.work_stream, stored.seq)
            ids.append((msg.headers or {}).get("Nats-Msg-Id"))
            stored = await client.bus.next_stored(ns.work_stream, ns.work("nobody"), stored.seq + 1)
    finally:
        await nc.close()
    assert ids == [f"{sid}:new:1", f"{sid}:resume:1:{seq}"]  # subjects.md: <session>:resume:<round>:<seq>
