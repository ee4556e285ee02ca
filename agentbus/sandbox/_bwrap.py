"""The confined sandbox: bubblewrap, with the ids mapped so a command never runs as host root."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from agentbus.errors import UsageError
from agentbus.sandbox._process import Fds, in_thread, read_json, run_process
from agentbus.sandbox._types import Limits, Mode, Outcome, Policy, SandboxUnavailable, base_env
from agentbus.workspace import hand_over

log = logging.getLogger("agentbus.sandbox")

INSIDE = "/work"  # where the workspace appears in the sandbox: no host path leaks through `pwd`
INSIDE_UID = 1000
# /etc files a command may need (the dynamic loader, certificates, `alternatives` links); never passwd/shadow.
ETC = ("alternatives", "ca-certificates", "ca-certificates.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
       "localtime", "nsswitch.conf", "protocols", "services", "ssl")  # fmt: skip
ETC_NETWORK = ("resolv.conf", "hosts", "gai.conf")


class Bubblewrap:
    """The confined sandbox (see the `agentbus.sandbox` docstring)."""

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
        """Nothing when `true` runs in the sandbox, else bwrap's first line of complaint."""
        with tempfile.TemporaryDirectory(prefix="agentbus-probe-") as tmp:
            outcome = in_thread(self.run("true", Path(tmp), Policy(limits=Limits(timeout_s=30))))
        if outcome.exit_code == 0:
            return ""
        first = outcome.output.decode(errors="replace").strip().splitlines()[:1]
        return first[0] if first else str(outcome)

    async def run(self, command: str, workspace: Path, policy: Policy) -> Outcome:
        if self.as_root:
            await asyncio.to_thread(hand_over, workspace, self.host_uid, self.host_gid)
        with Fds() as fds:
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
            return await run_process(
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

    async def _started(self, info_r: int, block_w: int | None, fds: Fds) -> int | None:
        """Once bwrap made the namespaces: a pidfd on the sandbox's pid 1, which becomes readable only
        after the kernel has killed and reaped every process of the pid namespace. As root, first map
        namespace root to host root (bwrap's own setup) and INSIDE_UID to the sandbox uid, then let bwrap go on."""
        info = await asyncio.to_thread(read_json, info_r)
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

    def _options(self, policy: Policy, fds: Fds, ws: int) -> list[str]:
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
        return opts + _read_only(policy.read_only)


def _read_only(paths: tuple[str, ...]) -> list[str]:
    """What a long-lived server brings with it (`_server.py`), bound after everything else so a path
    under /work or /tmp is not hidden by those mounts. The directories leading to it are made 0755 (bwrap
    would make them 0700, owned by the namespace's root, and the command could not pass through)."""
    opts: list[str] = []
    mounted = {INSIDE, "/tmp", "/usr", "/etc", "/proc", "/dev"}
    for path in paths:
        parents = Path(path).parents
        for parent in reversed(parents[:-1]):  # not "/"
            if str(parent) not in mounted:
                opts += ["--perms", "0755", "--dir", str(parent)]
        opts += ["--ro-bind", path, path]
    return opts


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
