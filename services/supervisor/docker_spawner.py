"""The docker spawner: one container per worker, on the host network, labelled so a restarted
supervisor finds its containers again.

Only the supervisor opens the engine socket; the agent containers it starts get no socket,
no capabilities, `no-new-privileges`, and only the environment listed in `passed_env`.

Tools that run commands run in bubblewrap inside the agent's container (README, "Sandbox"),
which needs two things Docker's defaults refuse: new user namespaces (the default seccomp
profile allows them only with CAP_SYS_ADMIN) and a fresh /proc (refused while Docker masks
paths under the container's /proc). Pools whose agents may run commands therefore get
`seccomp=unconfined`, `apparmor=unconfined` and no masked /proc paths (what `docker run
--security-opt systempaths=unconfined` asks for), and keep the rest:
a non-root user, every capability dropped, no-new-privileges, no engine socket. The other
way, a sibling container per tool call, would need the engine socket in the agent, which
would hand it the host.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentbus.config import Settings
from agentbus.errors import UsageError
from agentbus.messages import WorkerInfo
from services.supervisor.pools import PoolSpec
from services.supervisor.spawner import SpawnError, WorkerHandle, agent_args

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger("agentbus.supervisor")

LABEL = "io.agentbus"
WORKDIR = "/work"  # the agent's workspaces inside the container; a named volume `<prefix>-work` by default
_PASSED_PREFIXES = ("ANTHROPIC_", "OTEL_", "AGENTBUS_")
# paths on the supervisor's side, and its own identity: a container gets its own
_NOT_PASSED = ("AGENTBUS_WORKER_ID", "AGENTBUS_CREDS", "AGENTBUS_AGENT_CREDS", "AGENTBUS_CONTEXT_DIR")
CREDS_IN_CONTAINER = "/run/agentbus/agent.creds"
CONTAINER_UID = 10001  # the image's user (compose/Dockerfile)
CREDS_DIR_PREFIX = "agentbus-container-creds-"
# Built-in tools that run no command; any other tool (bash, a plug-in) may need the sandbox.
_NO_COMMANDS = frozenset({"read_file", "write_file", "delegate", "ask_human", "read_child_diff"})
# What bubblewrap needs inside a container, besides what every agent container gets (module docstring).
SANDBOX_SECURITY_OPT = ("seccomp=unconfined", "apparmor=unconfined")


def needs_sandbox(spec: PoolSpec) -> bool:
    """May the pool's agents run commands in bubblewrap (bash, or a plug-in the supervisor cannot judge)?"""
    return spec.sandbox == "bwrap" and any(t not in _NO_COMMANDS for t in spec.tools)


def security_opt(spec: PoolSpec) -> list[str]:
    """`no-new-privileges` always; the sandbox's needs when the pool's agents may run commands in it."""
    return ["no-new-privileges:true", *(SANDBOX_SECURITY_OPT if needs_sandbox(spec) else ())]


def repo_volume(spec: PoolSpec) -> list[str]:
    """The pool's repository, mounted read-write at the same path as on the host: its worktrees and the
    repository name each other by absolute path, so every worker (and the evaluator) must see both
    where the others do. Worktrees go in the workspace volume at /work, as every workspace does."""
    if not spec.repo:
        return []
    path = os.path.abspath(spec.repo)
    return [f"{path}:{path}"]


def passed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The supervisor's variables an agent container inherits: model keys, tracing and agentbus settings."""
    return {k: v for k, v in environ.items() if k.startswith(_PASSED_PREFIXES) and k not in _NOT_PASSED}


class ContainerHandle:
    def __init__(self, container: Container, worker_id: str, pool: str, log_dir: Path) -> None:
        self.container = container
        self.worker_id = worker_id
        self.pool = pool
        self.log_dir = log_dir

    @property
    def name(self) -> str:
        return str(self.container.name)

    async def alive(self) -> bool:
        import docker.errors
        import requests.exceptions

        try:
            await asyncio.to_thread(self.container.reload)
        except docker.errors.NotFound:
            return False
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            # The engine is restarting or slow: no news is not death. If the worker is really
            # gone its heartbeat stops, and the supervisor's silence check replaces it.
            log.warning("container %s: no status from the engine (%s)", self.name, err)
            return True
        return self.container.status in ("created", "running", "restarting")

    async def kill(self) -> None:
        with _engine_trouble(f"killing {self.name}"):
            await asyncio.to_thread(self.container.kill)

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the agent hands its sessions back), SIGKILL after `timeout`, then remove."""
        with _engine_trouble(f"stopping {self.name}"):
            await asyncio.to_thread(self.container.stop, timeout=max(1, int(timeout)))
        await self.reap()

    async def reap(self) -> None:
        """Copy the container's output to `<log_dir>/<worker id>.log`, then remove the container."""

        def _reap() -> None:
            with _engine_trouble(f"saving the output of {self.name}"):
                output = self.container.logs(stdout=True, stderr=True)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with (self.log_dir / f"{self.worker_id}.log").open("ab") as f:
                    f.write(output)
            with _engine_trouble(f"removing {self.name}"):
                self.container.remove(force=True)

        await asyncio.to_thread(_reap)


def sweep_orphaned_creds(tmp: Path) -> list[Path]:
    """Remove the credentials copies (`DockerSpawner.creds_for_containers`) of supervisors of this
    user that died without running their exit handlers, and return their folders.

    Only a folder whose `pid` file names a process that is gone: one still being made (no `pid`
    yet), another user's, or one from before the `pid` file is left alone. A container started
    by the dead supervisor keeps reading its copy: a bind-mounted file is the inode Docker mounted,
    which outlives its name."""
    removed = []
    for folder in tmp.glob(f"{CREDS_DIR_PREFIX}*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.geteuid():
                continue
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):
            continue
        if pid <= 0 or _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d credentials copies left by supervisors that died", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds the pid now
        return True
    return True


class DockerSpawner:
    """Starts `agentbus agent` in a container of the pool's image, with host networking so the
    agent reaches NATS at the same address the supervisor does."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        client: docker.DockerClient | None = None,
        environ: Mapping[str, str] | None = None,
        agent_creds: str = "",
    ) -> None:
        self.settings = settings
        # mounted read-only into each container: the file, never its contents in the environment
        self.agent_creds = str(Path(agent_creds or settings.creds).resolve()) if agent_creds or settings.creds else ""
        self.log_dir = log_dir
        self._client = client
        self.environ = os.environ if environ is None else environ
        self._creds_dir: Path | None = None

    def creds_for_containers(self) -> str:
        """A copy of the agent credentials the containers' user (uid 10001, compose/Dockerfile) may
        read, in a 0700 directory of the supervisor's, so no other user of the host reaches it.

        The original is 0600 and the supervisor's. As root the copy is given to uid 10001 (0600);
        otherwise it cannot be, and the copy is 0644 inside the private directory: only the
        bind mount exposes it, read-only, to the container. Copied again when the original
        changes (rotated credentials); removed with the directory when the supervisor exits, or,
        when it died without exiting (SIGKILL, the OOM killer), by the next supervisor to make one.
        """
        source = Path(self.agent_creds)
        if self._creds_dir is None:
            sweep_orphaned_creds(Path(tempfile.gettempdir()))
            self._creds_dir = Path(tempfile.mkdtemp(prefix=CREDS_DIR_PREFIX))
            (self._creds_dir / "pid").write_text(str(os.getpid()))
            atexit.register(shutil.rmtree, self._creds_dir, True)
        copy = self._creds_dir / "agent.creds"
        if not copy.exists() or copy.stat().st_mtime_ns < source.stat().st_mtime_ns:
            fresh = self._creds_dir / "agent.creds.new"
            fresh.write_bytes(source.read_bytes())
            if os.geteuid() == 0:
                os.chown(fresh, CONTAINER_UID, CONTAINER_UID)
                fresh.chmod(0o600)
            else:
                fresh.chmod(0o644)
            fresh.replace(copy)
        return str(copy)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = engine()
        return self._client

    def labels(self, spec: PoolSpec, worker_id: str) -> dict[str, str]:
        return {
            f"{LABEL}.role": "agent",
            f"{LABEL}.prefix": self.settings.prefix,
            f"{LABEL}.pool": spec.name,
            f"{LABEL}.worker": worker_id,
        }

    async def spawn(self, spec: PoolSpec, worker_id: str) -> WorkerHandle:
        name = f"{self.settings.prefix}-{worker_id}"
        env = {
            **passed_env(self.environ),
            **spec.env,
            "AGENTBUS_WORKER_ID": worker_id,
            "AGENTBUS_CONTAINER": name,
            "PYTHONUNBUFFERED": "1",
        }
        volumes = _with_workspace(spec.volumes, f"{self.settings.prefix}-work")
        volumes += repo_volume(spec)
        if self.agent_creds:
            env["AGENTBUS_CREDS"] = CREDS_IN_CONTAINER
            volumes.append(f"{self.creds_for_containers()}:{CREDS_IN_CONTAINER}:ro")
        host: dict[str, Any] = {
            "network_mode": "host",
            "init": True,  # reaps the bash tool's children; the agent handles SIGTERM itself
            "cap_drop": ["ALL"],
            "security_opt": security_opt(spec),
            # Workspaces must outlive the container: a session handed back on scale-down or after a
            # crash continues in another container, which must find the files the log speaks of.
            "binds": volumes,
        }
        create: dict[str, Any] = {
            "command": [*agent_args(spec, self.settings), "--workdir", WORKDIR],
            "entrypoint": ["agentbus"],
            "name": name,
            "environment": env,
            "labels": self.labels(spec, worker_id),
            "volumes": [v.split(":")[1] for v in volumes],
        }
        if self.agent_creds and os.geteuid() != 0:
            # as the supervisor's user, as before the credentials copy: files on host paths it
            # mounts (a pool's repository) are then the agent's to write (README, Repositories)
            create["user"] = f"{os.getuid()}:{os.getgid()}"

        def _run() -> Container:
            import docker.errors
            import requests.exceptions

            if not spec.pull:
                # A pull can take minutes (or reach a registry the operator never meant to use);
                # the supervisor starts what the engine has, unless the pool says `pull = true`.
                try:
                    self.client.images.get(spec.image)
                except docker.errors.ImageNotFound:
                    raise SpawnError(
                        f"image {spec.image} is not on this engine: build it (`make image`) or pull it, "
                        "or set `pull = true` on the pool"
                    ) from None
                except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
                    raise SpawnError(f"image {spec.image}: {_reason(err)}") from err
            try:
                return _create_and_start(self.client, spec, host, create)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
                # create + start: a failed start leaves a created container behind
                with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                    self.client.containers.get(name).remove(force=True)
                raise SpawnError(f"container {name} from image {spec.image}: {_reason(err)}") from err

        container = await asyncio.to_thread(_run)
        return ContainerHandle(container, worker_id, spec.name, self.log_dir)

    async def adopt(self, pools: dict[str, PoolSpec], registry: Sequence[WorkerInfo]) -> list[WorkerHandle]:
        """This prefix's agent containers of this file's docker pools: running ones are managed
        again, exited ones removed (their output kept in the log directory)."""
        mine = [f"{LABEL}.role=agent", f"{LABEL}.prefix={self.settings.prefix}"]
        filters: dict[str, str | list[str] | bool] = {"label": mine}
        found = await asyncio.to_thread(self.client.containers.list, all=True, filters=filters)
        adopted: list[WorkerHandle] = []
        for container in found:
            worker, pool = container.labels.get(f"{LABEL}.worker"), container.labels.get(f"{LABEL}.pool")
            spec = pools.get(pool or "")
            if not worker or spec is None or spec.spawner != "docker":
                continue  # a pool not in this file may be another supervisor's: left alone
            handle = ContainerHandle(container, worker, spec.name, self.log_dir)
            if container.status == "running":
                log.info("pool %s: adopted %s (container %s)", handle.pool, handle.worker_id, handle.name)
                adopted.append(handle)
            else:
                log.info("removing container %s (%s)", handle.name, container.status)
                await handle.stop(timeout=30)
        return adopted


def _create_and_start(
    client: docker.DockerClient, spec: PoolSpec, host: dict[str, Any], create: dict[str, Any]
) -> Container:
    """`containers.run(detach=True)` through the low-level API, so the host config can also carry
    `MaskedPaths = ReadonlyPaths = []` (what `--security-opt systempaths=unconfined` sends; docker-py
    has no option for it). A missing image is pulled only when the pool says `pull = true`."""
    import docker.errors

    host_config = client.api.create_host_config(**host)
    if needs_sandbox(spec):
        host_config["MaskedPaths"] = []
        host_config["ReadonlyPaths"] = []
    try:
        created = client.api.create_container(spec.image, host_config=host_config, **create)
    except docker.errors.ImageNotFound:
        if not spec.pull:
            raise
        client.images.pull(spec.image)
        created = client.api.create_container(spec.image, host_config=host_config, **create)
    client.api.start(created["Id"])
    return client.containers.get(created["Id"])


def _with_workspace(volumes: Sequence[str], default: str) -> list[str]:
    """The pool's volumes, plus the shared workspace volume unless one of them is mounted at /work."""
    targets = {v.split(":")[1] for v in volumes if v.count(":") >= 1}
    return [*volumes] if WORKDIR in targets else [*volumes, f"{default}:{WORKDIR}"]


@contextlib.contextmanager
def _engine_trouble(doing: str) -> Iterator[None]:
    """Engine errors while stopping or cleaning up are logged, not raised: a container already
    gone is the goal, and one the engine could not reach is found again by its labels."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.NotFound:
        pass
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as err:
        log.warning("%s: %s", doing, _reason(err))


def _reason(err: Exception) -> str:
    explanation = getattr(err, "explanation", None)
    return str(explanation or err)


def engine() -> docker.DockerClient:
    """The engine named by DOCKER_HOST (or the local socket), or a UsageError saying how to get one."""
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        raise UsageError(
            f"no Docker engine reachable ({err}); start dockerd or set DOCKER_HOST, "
            'or use spawner = "process" in the pools file'
        ) from err
    return client
