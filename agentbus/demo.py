"""`make demo`: `agentbus up` offline, one task that delegates, fails a check, revises, and passes.

It runs `agentbus up` (embedded NATS, router, evaluator, supervisor and its agents) exactly
as a person would, submits a task with a check, taps it live to the end, shows the child
session it delegated to, and stops everything with Ctrl-C (SIGINT). No API key needed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import agentbus
from agentbus.errors import AgentBusError
from agentbus.messages import SessionEnded
from agentbus.render import record_line

PROMPT = "Write a haiku about message queues to haiku.txt, with a title from another agent."
CHECK = 'test "$(wc -l < haiku.txt)" -eq 3'


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


async def _first_agent(bus: agentbus.Client, pool: str) -> None:
    """Until the supervisor's first agent of `pool` is in the registry (a new Python process: a
    second or so, longer on a cold machine), saying so rather than going quiet."""
    _say(f"waiting for the supervisor to start the first agent of pool {pool} (agentbus agents lists it)")
    deadline = asyncio.get_running_loop().time() + 120
    while not any(w.pool == pool for w in await bus.workers()):
        if asyncio.get_running_loop().time() > deadline:
            raise AgentBusError(f"no agent of pool {pool} started in 2 minutes; see the supervisor's lines above")
        await asyncio.sleep(0.1)


async def _drive(url: str, creds: str) -> int:
    async with agentbus.connect(url, settings=agentbus.Settings.from_env(creds=creds)) as bus:
        await _first_agent(bus, "general")
        sid = await bus.submit(PROMPT, pool="general", checks=[CHECK])
        _say(f"submitted {sid} with the check  {CHECK}")
        _say(f"tapping it live (the same as: agentbus tap {sid} --from-start)")
        async for record in bus.tap(sid, start="start"):
            print("   " + record_line(record), flush=True)
            if isinstance(record.event, SessionEnded):
                break
        state = await bus.state(sid)
        for child in state.children:
            _say(f"the subtask it delegated, session {child}:")
            for record in await bus.show(child):
                print("   " + record_line(record), flush=True)
        _say(
            f"session {state.status} after {state.round} rounds: {state.steps} model calls, "
            f"{state.tool_calls} tool calls, {state.usage.total} tokens, ${state.cost_usd:.4f} (as if real)"
        )
        print(state.result, flush=True)
        return 0 if state.status == "completed" else 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="agentbus-demo-", ignore_cleanup_errors=True) as root:
        try:
            return _demo(Path(root))
        except AgentBusError as err:
            print(f"agentbus demo: {err}", file=sys.stderr)
            return 1


def _demo(root: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}  # the demo is offline by design
    _say(f"starting: agentbus up --port 0 --store-dir {root}/.agentbus/nats")
    up = subprocess.Popen(
        [sys.executable, "-m", "agentbus.cli", "up", "--port", "0", "--store-dir", str(root / ".agentbus" / "nats")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=root,
    )  # fmt: skip
    assert up.stdout is not None
    url, creds = None, None
    while url is None or creds is None:
        line = up.stdout.readline().decode()
        if not line:
            _say("agentbus up exited before it was ready")
            return 1
        print(line, end="", flush=True)
        if m := re.search(r"export AGENTBUS_NATS_URL=(\S+)", line):
            url = m.group(1)
        if m := re.search(r"export AGENTBUS_CREDS=(\S+)", line):
            creds = m.group(1)  # the admin's, in the demo's own server store
    out = up.stdout
    stopping = threading.Event()

    def drain() -> None:
        # Keep reading `up`'s output so it never blocks on a full pipe; while the tap runs, the tap
        # is what we show, and once stopping, what `up` says about it.
        for raw in iter(out.readline, b""):
            if stopping.is_set():
                print(raw.decode(errors="replace"), end="", flush=True)

    shown = threading.Thread(target=drain, daemon=True)
    shown.start()
    try:
        code = asyncio.run(_drive(url, creds))
    finally:
        _say("Ctrl-C to agentbus up (the supervisor stops its agents first; they hand back their sessions)")
        stopping.set()
        up.send_signal(signal.SIGINT)
        up.wait(timeout=90)
        shown.join(timeout=10)
    _say(f"everything stopped (agentbus up exited {up.returncode})")
    return code or up.returncode


if __name__ == "__main__":
    sys.exit(main())
