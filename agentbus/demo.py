"""`make demo`: the whole path on one machine, offline: embedded NATS, one agent, a task, a live tap.

It starts `agentbus server` and `agentbus agent` as real processes (the same commands a
person would type), submits a task with the scripted model, taps it to the end, and
stops everything. Nothing needs an API key.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

import agentbus
from agentbus.render import record_line
from agentbus.server import NatsServer

SCRIPT = files("agentbus") / "scripted" / "demo.json"


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


async def _drive(url: str) -> int:
    async with agentbus.connect(url) as bus:
        sid = await bus.submit("Write a haiku about message queues to haiku.txt.", pool="writers")
        _say(f"submitted session {sid} to pool 'writers'; tapping it live (agentbus tap {sid} --from-start)")
        async for record in bus.tap(sid, start="start"):
            print("   " + record_line(record), flush=True)
            if isinstance(record.event, agentbus.messages.SessionEnded):
                break
        state = await bus.state(sid)
        _say(
            f"session {state.status}: {state.steps} model calls, {state.tool_calls} tool calls, "
            f"{state.usage.total} tokens, ${state.cost_usd:.4f} (priced as if it were the real model)"
        )
        print(state.result)
        return 0 if state.status == "completed" else 1


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="agentbus-demo-"))
    _say("starting the embedded nats-server (JetStream, 127.0.0.1, free port)")
    with NatsServer(store_dir=workdir / "nats") as server:
        _say(f"nats-server ready at {server.url}; starting an agent for pool 'writers' with the offline scripted model")
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentbus.cli",
                "agent",
                "--pool",
                "writers",
                "--model",
                f"scripted:{SCRIPT}",
                "--workdir",
                str(workdir / "work"),
                "--nats",
                server.url,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            code = asyncio.run(_drive(server.url))
            _say(f"the agent wrote its file in its session workspace: {next((workdir / 'work').glob('*/haiku.txt'))}")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        _say("agent drained and stopped; stopping nats-server")
    return code


if __name__ == "__main__":
    sys.exit(main())
