"""`agentbus up`: everything on one machine, in the foreground, one log prefix per process.

The embedded nats-server runs in this process's care; router, evaluator and supervisor are
the same commands a person would start by hand, as child processes. Ctrl-C stops them in
order: the supervisor first (its agents hand their sessions back), then the rest, then NATS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from importlib.resources import files
from pathlib import Path
from typing import IO

from agentbus.server import NatsServer

DEMO_SCRIPT = files("agentbus") / "scripted" / "demo.json"
_COLOURS = {"router": "36", "evaluator": "35", "supervisor": "33", "nats": "32", "up": "1"}


def default_pools(store: Path) -> tuple[Path, str]:
    """A pools file for a newcomer: Claude if there is a key, else the offline scripted model."""
    if os.environ.get("ANTHROPIC_API_KEY"):
        model, note = "anthropic:claude-sonnet-4-6", "agents use anthropic:claude-sonnet-4-6 (ANTHROPIC_API_KEY is set)"
    else:
        model = f"scripted:{DEMO_SCRIPT}"
        note = "no ANTHROPIC_API_KEY: agents use the offline scripted model (agentbus/scripted/demo.json)"
    path = store / "pools.toml"
    path.write_text(
        "[pools.general]\n"
        f'model = "{model}"\n'
        'tools = ["read_file", "write_file", "delegate", "ask_human"]\n'
        "min = 1\nmax = 3\nconcurrency = 4\nidle_s = 20\n"
    )
    return path, note


def _say(name: str, line: str) -> None:
    tag = f"{name:<10}|"
    if sys.stdout.isatty():
        tag = f"\033[{_COLOURS.get(name, '0')}m{tag}\033[0m"
    sys.stdout.write(f"{tag} {line}\n")
    sys.stdout.flush()


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        _say(name, raw.decode(errors="replace").rstrip())


def run_up(*, pools_file: str | None, port: int, store_dir: str) -> int:
    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    if pools_file is None:
        pools, note = default_pools(Path(tempfile.mkdtemp(prefix="agentbus-up-")))
        _say("up", note)
    else:
        pools = Path(pools_file)
    server = NatsServer(port=port, store_dir=store)
    server.start()
    _say("nats", f"nats-server ready on {server.url} (JetStream store {store})")
    base = [sys.executable, "-m", "agentbus.cli"]
    nats = ["--nats", server.url]
    roles = {
        "router": [*base, "router", *nats],
        "evaluator": [*base, "evaluator", *nats, "--workdir", str(store.parent / "work")],
        "supervisor": [*base, "supervisor", "--pools", str(pools), *nats,
                       "--log-dir", str(store.parent / "logs"), "--workdir", str(store.parent / "work")],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        for name, cmd in roles.items():
            procs[name] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            threading.Thread(target=_pump, args=(name, procs[name].stdout), daemon=True).start()
        _say("up", f"ready. In another terminal: export AGENTBUS_NATS_URL={server.url}")
        _say("up", '  agentbus submit "write a haiku about queues" --pool general; agentbus tap --all --from-start')
        _say("up", "Ctrl-C stops everything")
        while not stop.wait(0.5):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                _say("up", f"{', '.join(dead)} exited ({procs[dead[0]].returncode}); stopping everything")
                code = 1
                break
    finally:
        _say("up", "stopping: supervisor first (agents hand back their sessions), then router, evaluator, NATS")
        for name in ("supervisor", "router", "evaluator"):
            p = procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(45)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        server.stop()
        _say("up", "stopped")
    return code
