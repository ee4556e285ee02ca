"""`agentbus up`: everything on one machine, in the foreground, one log prefix per process.

The embedded nats-server runs in this process's care; router, evaluator and supervisor are
the same commands a person would start by hand, as child processes. Ctrl-C stops them in
order: the supervisor first (its agents hand their sessions back), then the rest, then NATS.

Everything is checked before anything starts: the port, the pools file (by `agentbus supervisor
--check`, so this module never imports a service) and the store directory's lock. Every child
dies with this process however it dies (a parent-death signal), and the scratch directory for a
default pools file is removed on the way out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from importlib.resources import files
from pathlib import Path
from typing import IO

from agentbus.auth import write_context
from agentbus.config import Settings
from agentbus.errors import AgentBusError, UsageError
from agentbus.roles import Identity
from agentbus.server import NatsServer, check_port_free, die_with_parent, provision_namespace

DEMO_SCRIPT = files("agentbus") / "scripted" / "demo.json"
_COLOURS = {"router": "36", "evaluator": "35", "supervisor": "33", "nats": "32", "web": "34", "up": "1"}
WEB_PORT = 8765  # the web view's port unless told (agentbus/web)


def default_pools(store: Path) -> tuple[Path, str]:
    """A pools file for a newcomer: pool `general` on Claude if there is a key, else on the offline
    scripted model; and pool `slow`, always scripted, a few seconds a step (agentbus/scripted/slow.json),
    with a short ack wait, so a person can steer a session or kill its agent and watch it resume."""
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
        "\n[pools.slow]\n"
        'model = "scripted:slow"\n'
        'tools = ["read_file", "write_file", "ask_human"]\n'
        "min = 0\nmax = 2\nconcurrency = 2\nidle_s = 60\nack_wait_s = 10\n"
    )
    return path, note


def deployment_creds(server: NatsServer) -> tuple[Path, Path]:
    """Credentials for `up`'s own processes, made on first start and kept in the server's state
    directory: `service` for router, evaluator and supervisor, `agent` for the workers."""
    assert server.auth is not None
    prefix = Settings.from_env().prefix
    paths = []
    changed = False
    for name, role in (("up-service", "service"), ("up-agents", "agent")):
        path = server.auth.creds_path(name)
        changed |= server.auth.ensure(Identity(user=name, role=role, prefix=prefix), path)  # type: ignore[arg-type]
        paths.append(path)
    if changed:
        server.reload()
    return paths[0], paths[1]


def _say(name: str, line: str) -> None:
    tag = f"{name:<10}|"
    if sys.stdout.isatty():
        tag = f"\033[{_COLOURS.get(name, '0')}m{tag}\033[0m"
    sys.stdout.write(f"{tag} {line}\n")
    sys.stdout.flush()


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        _say(name, raw.decode(errors="replace").rstrip())


def run_up(*, pools_file: str | None, port: int, store_dir: str, web_port: int | None = WEB_PORT) -> int:
    """Run until Ctrl-C or SIGTERM (0), or until a process exits on its own (1). `web_port` None: no web view."""
    with tempfile.TemporaryDirectory(prefix="agentbus-up-") as scratch:
        return _run(pools_file, port, Path(store_dir), Path(scratch), web_port)


def web_port_for(requested: int, nats_port: int) -> int:
    """The web view's port: the one asked for; any free one for 0 (and when NATS's port is 0, as in
    tests running side by side); the default taken by something else moves to a free one."""
    if requested == WEB_PORT:
        if nats_port != 0:
            try:
                check_port_free("127.0.0.1", WEB_PORT)
                return WEB_PORT
            except AgentBusError:
                _say("up", f"port {WEB_PORT} is taken; the web view takes a free port instead")
    elif requested:
        check_port_free("127.0.0.1", requested)  # a port asked for by name must be free
        return requested
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def check_pools(pools: Path) -> str:
    """What the supervisor says of a pools file (`--check`): keys, limits, each pool's model. Raises
    the error it reports, so a bad file stops `up` before anything starts."""
    cmd = [sys.executable, "-m", "agentbus.cli", "supervisor", "--pools", str(pools), "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"agentbus supervisor --check exited {proc.returncode}"]
        message = lines[-1].removeprefix("agentbus: ")
        raise UsageError(message) if proc.returncode == 2 else AgentBusError(message)
    return proc.stdout.strip()


def _run(pools_file: str | None, port: int, store: Path, scratch: Path, web_port: int | None) -> int:
    if port:
        check_port_free("127.0.0.1", port)  # before anything else: the usual reason `up` cannot start
    web = web_port_for(web_port, port) if web_port is not None else None
    if pools_file is None:
        pools, note = default_pools(scratch)
        _say("up", note)
    else:
        pools = Path(pools_file)
        _say("up", check_pools(pools))
    # Signals first: a Ctrl-C while nats-server starts must stop it in order, not leave it to die.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = NatsServer(port=port, store_dir=store)
    server.start()  # takes the store's lock first: a store another server holds is never opened
    procs: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        _say("nats", f"nats-server ready on {server.url} (JetStream store {store})")
        problem = provision_namespace(server)  # before any process: a client of any language finds the streams
        if problem:
            _say("up", f"warning: streams not provisioned at start ({problem}); the services will")
        envs = _environments(server, port)
        for name, cmd in _roles(server.url, pools, store, web).items():
            if stop.is_set():
                break
            procs[name] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=envs[name],
                # SIGTERM, not SIGKILL: a supervisor orphaned by `kill -9 up` still drains its agents
                preexec_fn=die_with_parent(signal.SIGTERM),
            )  # fmt: skip
            threading.Thread(target=_pump, args=(name, procs[name].stdout), daemon=True).start()
        _say("up", f"ready. In another terminal: export AGENTBUS_NATS_URL={server.url}")
        if not port:
            _say("up", f"  export AGENTBUS_CREDS={server.admin_creds}")
        _say("up", '  agentbus submit "write a haiku about queues" --pool general; agentbus tap --all --from-start')
        _say("up", "  pool slow (offline, seconds a step) leaves time to say, or to kill -9 its agent and watch")
        if web is not None:
            _say("up", f"web view: http://127.0.0.1:{web}/ (log in with the credentials file {server.admin_creds})")
        _say("up", "Ctrl-C stops everything")
        while not stop.wait(0.5):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                _say("up", f"{', '.join(dead)} exited ({procs[dead[0]].returncode}); stopping everything")
                code = 1
                break
    finally:
        _say("up", "stopping: supervisor first (agents hand back their sessions), then router, evaluator, NATS")
        _stop(procs)
        server.stop()
        _say("up", "stopped")
    return code


def _environments(server: NatsServer, port: int) -> dict[str, dict[str, str]]:
    """Each process's environment: credentials by path, never on a command line (which any local
    user can read); the supervisor hands its agents their own."""
    service_creds, agent_creds = deployment_creds(server)
    if port and server.admin_creds is not None:
        write_context(server.url, server.admin_creds)  # this user's CLI finds the admin's credentials
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AGENTBUS_CREDS": str(service_creds)}
    # the web view holds no credentials: each person logs in with theirs
    web = {k: v for k, v in env.items() if k != "AGENTBUS_CREDS"}
    return {
        "router": env,
        "evaluator": env,
        "supervisor": {**env, "AGENTBUS_AGENT_CREDS": str(agent_creds)},
        "web": web,
    }


def _roles(url: str, pools: Path, store: Path, web: int | None = None) -> dict[str, list[str]]:
    """The command line of each process `up` runs, in start order."""
    base = [sys.executable, "-m", "agentbus.cli"]
    nats = ["--nats", url]
    roles = {
        "router": [*base, "router", *nats],
        "evaluator": [*base, "evaluator", *nats, "--workdir", str(store.parent / "work")],
        "supervisor": [*base, "supervisor", "--pools", str(pools), *nats,
                       "--log-dir", str(store.parent / "logs"), "--workdir", str(store.parent / "work")],
    }  # fmt: skip
    if web is not None:  # the web view (agentbus/web), on 127.0.0.1
        roles["web"] = [*base, "web", *nats, "--port", str(web), "--pools", str(pools)]
    return roles


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM the supervisor and wait (its agents hand back their sessions), then the rest at once."""
    for names in (("supervisor",), ("router", "evaluator", "web")):
        running = [p for n in names if (p := procs.get(n)) is not None and p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        for p in running:
            try:
                p.wait(45)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
