"""Where commands a model or a submitter wrote run: bubblewrap, or (only when a pool says so) unconfined.

One `run()` is one `/bin/sh -c COMMAND` in fresh namespaces (user, pid, mount, ipc, uts,
cgroup, and network unless the policy allows it), with the session workspace as the only
writable host directory (at `/work`), `/usr` and a few `/etc` files read-only, a private
`/tmp`, a fresh `/proc`, an empty environment plus the policy's allow-list, and rlimits set
inside the new user namespace (so the process count is this call's alone). When `run()`
returns, every process of the call is gone: the sandbox's pid 1 exiting tears the pid
namespace down, and `--die-with-parent` does the same when the caller is killed.

Fork bombs: RLIMIT_NPROC is ignored for processes whose real uid is host root, and a user
namespace that maps to host uid 0 keeps that exemption. So the command never runs as host
root: an agent running as a normal user maps the sandbox to its own uid (the limit then
counts the processes of this call's user namespace, Linux >= 5.14); an agent running as
root maps the command to an unprivileged uid (`AGENTBUS_SANDBOX_UID`, 65534 by default),
writing the namespace's id map itself while bwrap waits (`--userns-block-fd`), and hands
the workspace to that uid first.

`AGENTBUS_BWRAP` names the bwrap binary (default: `bwrap` on PATH); `AGENTBUS_BWRAP=/nonexistent`
simulates a machine without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from agentbus.errors import UsageError
from agentbus.workspace import hand_over

log = logging.getLogger("agentbus.sandbox")

Mode = Literal["bwrap", "none"]
MODES: tuple[Mode, ...] = ("bwrap", "none")
INSIDE = "/work"  # where the workspace appears in the sandbox: no host path leaks through `pwd`
INSIDE_UID = 1000
PATH = "/usr/local/bin:/usr/bin:/bin"
# Names a tool's environment may never carry, whatever the pool says: the bus, the model key, tracing.
RESERVED_PREFIXES = ("AGENTBUS_", "ANTHROPIC_", "NATS_", "OTEL_")
# /etc files a command may need (the dynamic loader, certificates, `alternatives` links); never passwd/shadow.
ETC = ("alternatives", "ca-certificates", "ca-certificates.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
       "localtime", "nsswitch.conf", "protocols", "services", "ssl")  # fmt: skip
ETC_NETWORK = ("resolv.conf", "hosts", "gai.conf")
_SIGNALS = {
    signal.SIGXCPU: "the CPU time limit",
    signal.SIGXFSZ: "the file size limit",
    signal.SIGKILL: "SIGKILL",
    signal.SIGSEGV: "SIGSEGV",
}

T = TypeVar("T")


class SandboxUnavailable(UsageError):
    """The sandbox cannot run here (no bwrap, namespaces refused): commands are refused, not run bare."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per call. Memory is address space per process (RLIMIT_AS); processes count this call's alone."""

    timeout_s: float = 120.0
    cpu_s: int = 600
    memory_bytes: int = 4 << 30
    processes: int = 256
    file_bytes: int = 1 << 30
    open_files: int = 1024
    tmp_bytes: int = 512 << 20
    output_bytes: int = 64_000


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What one call may have besides the workspace: network, environment, limits, and what to do
    with output past the cap (`stop` the command, or `drain` it and keep only the first bytes)."""

    network: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    overflow: Literal["stop", "drain"] = "stop"


@dataclass(frozen=True)
class Outcome:
    """How a call ended. `exit_code` is None when the sandbox stopped it (timeout, output cap)."""

    exit_code: int | None
    output: bytes
    cut: bool = False
    timed_out: bool = False

    def why(self) -> str:
        """` (killed by the CPU time limit)` and the like, for an exit code that is a signal."""
        code = self.exit_code
        if code is None or code <= 128:
            return ""
        try:
            sig = signal.Signals(code - 128)
        except ValueError:
            return ""
        return f" (killed by {_SIGNALS.get(sig, sig.name)})"


class Sandbox(Protocol):
    """Runs one command against one workspace; every process it started is gone when `run` returns."""

    name: Mode
    confined: bool

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome: ...

    def probe(self) -> None:
        """Run `true` inside; raise SandboxUnavailable with the reason if it cannot run."""


def base_env(home: str) -> dict[str, str]:
    return {"PATH": PATH, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


def tool_environment(entries: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-list: `NAME` takes the value the agent has (left out when unset), `NAME=VALUE` sets it.

    Names of the bus, the model key and tracing are refused even when asked for: they never reach a tool.
    """
    env: dict[str, str] = {}
    for entry in entries:
        name, eq, value = entry.partition("=")
        if not (name.isascii() and name.replace("_", "a").isalnum()) or name[0].isdigit():
            raise UsageError(f"tool_env entry {entry!r}: expected NAME or NAME=VALUE")
        if name.upper().startswith(RESERVED_PREFIXES):
            raise UsageError(f"tool_env entry {name}: {', '.join(RESERVED_PREFIXES)}* never reach a tool")
        if eq:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env


class Bubblewrap:
    """The confined sandbox (see the module docstring)."""

    name: Mode = "bwrap"
    confined = True

    def __init__(self, bwrap: str | None = None, *, sandbox_uid: int | None = None) -> None:
        env = os.environ
        self.bwrap = bwrap or env.get("AGENTBUS_BWRAP") or shutil.which("bwrap") or "bwrap"
        self.as_root = os.geteuid() == 0
        uid = sandbox_uid if sandbox_uid is not None else int(env.get("AGENTBUS_SANDBOX_UID", "65534"))
        if self.as_root and uid == 0:
            raise UsageError("AGENTBUS_SANDBOX_UID must not be 0: commands never run as host root")
        self.host_uid = uid if self.as_root else os.getuid()
        self.host_gid = uid if self.as_root else os.getgid()
        self.fresh_proc = True  # False: an empty /proc (see probe)

    def probe(self) -> None:
        """Run `true` inside. Where the kernel refuses a fresh /proc (a container whose /proc has masked
        paths, as Docker's default), commands get an empty /proc instead, which the log says: the pid
        namespace still hides every other process, only tools that read /proc (ps) lose their view."""
        if not (os.sep in self.bwrap and os.access(self.bwrap, os.X_OK)):
            raise SandboxUnavailable(f"bubblewrap not found ({self.bwrap}); install the bubblewrap package")
        failure = first = self._try_true()
        if "mount proc" in first:
            self.fresh_proc = False
            if not (failure := self._try_true()):
                log.warning("this host refuses a fresh /proc in a sandbox (%s): commands get an empty /proc", first)
        if failure:
            hint = " (in a container: see the README's Sandbox section)" if Path("/.dockerenv").exists() else ""
            raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here{hint}: {failure}")

    def _try_true(self) -> str:
        """ "" when `true` runs in the sandbox, else bwrap's first line."""
        with tempfile.TemporaryDirectory(prefix="agentbus-probe-") as tmp:
            outcome = _in_thread(self.run("true", Path(tmp), Policy(limits=Limits(timeout_s=30))))
        if outcome.exit_code == 0:
            return ""
        first = outcome.output.decode(errors="replace").strip().splitlines()[:1]
        return first[0] if first else str(outcome)

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome:
        if self.as_root:
            await asyncio.to_thread(hand_over, workspace, self.host_uid, self.host_gid)
        with _Fds() as fds:
            ws = fds.keep(os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            options = self._options(policy, fds, ws)
            info_r, info_w = fds.pipe()
            options += ["--info-fd", str(fds.pass_(info_w))]
            block_w = None
            if self.as_root:
                block_r, block_w = fds.pipe()
                options += ["--userns-block-fd", str(fds.pass_(block_r))]
            else:
                options += ["--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID)]
            args = fds.pass_(fds.data("args", b"".join(o.encode() + b"\0" for o in options)))
            inner = [*self._drop(), *_prlimit(policy.limits), "--", "/bin/sh", "-c", command]
            return await _run_process(
                [self.bwrap, "--args", str(args), "--", *inner],
                policy,
                env={},
                pass_fds=fds.passed,
                spawned=fds.close_passed,
                setup=lambda: self._started(info_r, block_w, fds),
            )

    def _drop(self) -> list[str]:
        """As root, bwrap's command starts as root of the namespace; this makes it INSIDE_UID (host
        `sandbox_uid`) with no capabilities before the limits and the shell."""
        if not self.as_root:
            return []
        ids = str(INSIDE_UID)
        return ["/usr/bin/setpriv", f"--reuid={ids}", f"--regid={ids}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]  # fmt: skip

    async def _started(self, info_r: int, block_w: int | None, fds: _Fds) -> int | None:
        """Once bwrap made the namespaces: a pidfd on the sandbox's pid 1, which becomes readable only
        after the kernel has killed and reaped every process of the pid namespace. As root, first map
        namespace root to host root (bwrap's own setup) and INSIDE_UID to the sandbox uid, then let bwrap go on."""
        info = await asyncio.to_thread(_read_json, info_r)
        pid = int(info["child-pid"])
        try:
            pidfd: int | None = fds.keep(os.pidfd_open(pid))
        except ProcessLookupError:
            pidfd = None  # pid 1 and its namespace are already gone
        if block_w is not None:
            proc_dir = Path("/proc") / str(pid)
            (proc_dir / "uid_map").write_text(f"0 0 1\n{INSIDE_UID} {self.host_uid} 1\n")
            (proc_dir / "gid_map").write_text(f"0 0 1\n{INSIDE_UID} {self.host_gid} 1\n")
            os.write(block_w, b"1")
        return pidfd

    def _options(self, policy: Policy, fds: _Fds, ws: int) -> list[str]:
        lim = policy.limits
        env = {**base_env(INSIDE), **policy.env}
        opts = ["--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv",
                "--hostname", "sandbox"]  # fmt: skip
        if policy.network:
            opts.append("--share-net")
        for name, value in env.items():
            opts += ["--setenv", name, value]
        opts += ["--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                opts += ["--symlink", os.readlink(host), f"/{top}"]
            elif host.is_dir():
                opts += ["--ro-bind", str(host), f"/{top}"]
        for name in (*ETC, *(ETC_NETWORK if policy.network else ())):
            opts += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for name, text in _etc_files(policy.network).items():
            data = fds.pass_(fds.data(name, text.encode()))
            opts += ["--perms", "0444", "--ro-bind-data", str(data), f"/etc/{name}"]
        opts += ["--bind-fd", str(fds.pass_(ws)), INSIDE, "--perms", "1777", "--size", str(lim.tmp_bytes),
                 "--tmpfs", "/tmp", "--dev", "/dev", "--chdir", INSIDE]  # fmt: skip
        opts += ["--proc", "/proc"] if self.fresh_proc else ["--dir", "/proc"]
        return opts


class Unconfined:
    """`sandbox = "none"`: the command runs as the agent's own user with the allow-listed environment,
    a timeout and an output cap, and nothing else. Its process group is killed at the end, but a
    process that leaves the group survives. Only for pools that say so, with a warning at start."""

    name: Mode = "none"
    confined = False

    def probe(self) -> None:
        """Always runs."""

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome:
        pgid: list[int] = []

        def kill_group() -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid[0], signal.SIGKILL)

        return await _run_process(
            ["/bin/sh", "-c", command],
            policy,
            env={**base_env(str(workspace)), **policy.env},
            cwd=workspace,
            spawned=lambda proc: pgid.append(proc.pid),
            exited=kill_group,
        )


def open_sandbox(mode: str, *, needed_by: str) -> Sandbox:
    """The sandbox a process asked for, probed once: `bwrap` that cannot run is refused with the reason."""
    if mode == "none":
        log.warning("%s run UNCONFINED (sandbox = \"none\"): commands see this user's files, environment "
                    "and network", needed_by)  # fmt: skip
        return Unconfined()
    if mode != "bwrap":
        raise UsageError(f"sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    sandbox = Bubblewrap()
    try:
        sandbox.probe()
    except SandboxUnavailable as err:
        raise SandboxUnavailable(
            f'{needed_by} cannot run: {err}; or set sandbox = "none" (--sandbox none) to run commands unconfined'
        ) from None
    return sandbox


# --- plumbing --------------------------------------------------------------------------------------


def _etc_files(network: bool) -> dict[str, str]:
    """Made up, not the host's: no host accounts, and no host names without the network."""
    files = {
        "passwd": f"root:x:0:0:root:/:/usr/sbin/nologin\ntool:x:{INSIDE_UID}:{INSIDE_UID}:tool:{INSIDE}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\ntool:x:{INSIDE_UID}:\nnogroup:x:65534:\n",
    }
    if not network:
        files["hosts"] = "127.0.0.1 localhost sandbox\n::1 localhost\n"
    return files


def _prlimit(lim: Limits) -> list[str]:
    # Set inside the new user namespace, after bwrap made it: RLIMIT_NPROC then counts this call's
    # processes, not every process of the uid (the namespace's own cap comes from bwrap's, unlimited).
    # CPU: SIGXCPU at the soft limit (the shell reports it), SIGKILL a second later if it is ignored.
    return ["/usr/bin/prlimit", f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}", f"--as={lim.memory_bytes}",
            f"--nproc={lim.processes}", f"--fsize={lim.file_bytes}", f"--nofile={lim.open_files}",
            "--core=0"]  # fmt: skip


class _Sink(asyncio.Protocol):
    """Keeps the first `cap` bytes of a pipe and counts on past them; `done` when the pipe closes,
    or at once past the cap when `stop` (the caller then kills the writer)."""

    def __init__(self, cap: int, *, stop: bool) -> None:
        self.cap = cap
        self.stop = stop
        self.out = bytearray()
        self.cut = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.out)
        self.out += data[:room]
        if len(data) > room:
            self.cut = True
            if self.stop and not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _run_process(
    argv: list[str],
    policy: Policy,
    *,
    env: dict[str, str],
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
    spawned: Callable[[asyncio.subprocess.Process], None] | None = None,
    setup: Callable[[], Awaitable[int | None]] | None = None,
    exited: Callable[[], None] | None = None,
) -> Outcome:
    """Start `argv` with stdout and stderr on one pipe we read ourselves (never paused, so a full pipe
    cannot hide the end of the process), keep at most the cap, and return after the timeout at the
    latest; whatever happens, the process is killed and reaped before this returns."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=w, stderr=w, env=env, cwd=cwd,
            pass_fds=tuple(pass_fds), start_new_session=True,
        )  # fmt: skip
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    if spawned is not None:
        spawned(proc)
    sink = _Sink(policy.limits.output_bytes, stop=policy.overflow == "stop")
    transport, _ = await loop.connect_read_pipe(lambda: sink, os.fdopen(r, "rb", buffering=0))
    exit_code: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
    pidfd: int | None = None
    try:
        async with asyncio.timeout(policy.limits.timeout_s):
            if setup is not None:
                with contextlib.suppress(SandboxUnavailable):  # bwrap failed early: its output says why
                    pidfd = await setup()
            either: set[asyncio.Future[Any]] = {sink.done, exit_code}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if sink.cut and sink.stop:
                return Outcome(None, bytes(sink.out), cut=True)
            code = await exit_code
            if exited is not None:
                exited()
            await sink.done
            if pidfd is not None:
                await _ended(pidfd)
    except TimeoutError:
        return Outcome(None, bytes(sink.out), cut=sink.cut, timed_out=True)
    finally:
        transport.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # bwrap's pid 1 dies with it (--die-with-parent), the pid namespace with its pid 1
        await exit_code
        if exited is not None:
            exited()
        if pidfd is not None:
            # bwrap exits with its command; its pid 1 (killed with it, --die-with-parent) takes the
            # pid namespace down: once that is done, no process of the call is left.
            await _ended(pidfd)
    return Outcome(code, bytes(sink.out), cut=sink.cut)


async def _ended(pidfd: int) -> None:
    """Until the process behind `pidfd` has exited (for a pid namespace's pid 1: with all of the namespace)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


def _read_json(fd: int) -> dict[str, Any]:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
        with contextlib.suppress(ValueError):
            parsed: dict[str, Any] = json.loads(data)
            return parsed
    raise SandboxUnavailable(f"bwrap ended before it created the namespace ({data[:200]!r})")


def _in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end on a loop of its own, from sync code that may sit inside a running loop."""
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=target, name="agentbus-sandbox-probe")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class _Fds:
    """File descriptors for one bwrap start: ours are closed at the end, the child's copies right after spawn."""

    def __init__(self) -> None:
        self.owned: list[int] = []
        self.passed: list[int] = []

    def __enter__(self) -> _Fds:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned.clear()

    def keep(self, fd: int) -> int:
        self.owned.append(fd)
        return fd

    def pass_(self, fd: int) -> int:
        self.passed.append(fd)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        return self.keep(r), self.keep(w)

    def data(self, name: str, content: bytes) -> int:
        fd = self.keep(os.memfd_create(f"agentbus-{name}"))
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close_passed(self, proc: object = None) -> None:
        """The child has its copies; ours of the pipe ends it uses must go, or EOF never comes."""
        for fd in self.passed:
            if fd in self.owned:
                self.owned.remove(fd)
                os.close(fd)
        self.passed.clear()
