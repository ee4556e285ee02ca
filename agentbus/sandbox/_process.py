"""Running one sandbox process: output read from our own pipe up to a cap, a timeout, and the end
of the whole pid namespace awaited through a pidfd on its pid 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agentbus.sandbox._types import Outcome, Policy, SandboxUnavailable

T = TypeVar("T")


class Sink(asyncio.Protocol):
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


async def run_process(
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
    sink = Sink(policy.limits.output_bytes, stop=policy.overflow == "stop")
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
                await ended(pidfd)
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
            await ended(pidfd)
    return Outcome(code, bytes(sink.out), cut=sink.cut)


async def ended(pidfd: int) -> None:
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


def read_json(fd: int) -> dict[str, Any]:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
        with contextlib.suppress(ValueError):
            parsed: dict[str, Any] = json.loads(data)
            return parsed
    raise SandboxUnavailable(f"bwrap ended before it created the namespace ({data[:200]!r})")


def in_thread(coro: Coroutine[Any, Any, T]) -> T:
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


class Fds:
    """File descriptors for one bwrap start: ours are closed at the end, the child's copies right after spawn."""

    def __init__(self) -> None:
        self.owned: list[int] = []
        self.passed: list[int] = []

    def __enter__(self) -> Fds:
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
