"""Files inside a session workspace, opened without ever following a symlink.

A path is split into components and walked one directory at a time with
`os.open(part, O_NOFOLLOW | O_DIRECTORY, dir_fd=parent)`, so a symlink swapped in
between a check and an open cannot lead outside: there is no check-then-open, only
opens that refuse symlinks. The rule is deliberately simple: file tools do not follow
symlinks at all, inside the workspace or out (the sandboxed `bash` can).

Also here: where a session's workspace is under a root (the evaluator finds it from its
own configuration, never from an event), a copy that takes only regular files,
directories and symlinks (a FIFO would hang a naive copy), and handing a workspace to
the unprivileged uid the sandbox runs commands as.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from agentbus.errors import UsageError
from agentbus.subjects import valid_token

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16


class PathRefused(UsageError):
    """A path that leaves the workspace, crosses a symlink or names something that is not a file."""


def parts_of(path: str) -> list[str]:
    """The components of a path relative to the workspace; `..` that climbs out and absolute paths are refused."""
    if "\0" in path:
        raise PathRefused(f"path {path!r} contains a NUL byte")
    normal = posixpath.normpath(path) if path else "."
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        raise PathRefused(f"path {path!r} is outside the session workspace")
    return [p for p in normal.split("/") if p not in ("", ".")]


def session_workspace(root: Path, session_id: str) -> Path:
    """`root/<session id>`, for a valid session id, refusing anything that would resolve outside `root`."""
    if not valid_token(session_id):
        raise PathRefused(f"session id {session_id!r} cannot name a workspace")
    base = root.resolve()
    path = (base / session_id).resolve()
    if path.parent != base:
        raise PathRefused(f"the workspace of {session_id} resolves outside {base}")
    return path


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _step(parent: int, name: str, shown: str, *, create: bool) -> int:
    """Open one directory below `parent`, refusing symlinks; with `create`, make it first if missing."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise PathRefused(f"no such directory: {shown}") from None
    except OSError as err:
        raise _refusal(err, parent, name, shown) from None
    with contextlib.suppress(FileExistsError):  # made meanwhile: the open below still refuses a symlink
        os.mkdir(name, 0o777, dir_fd=parent)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        raise _refusal(err, parent, name, shown) from None


def _refusal(err: OSError, parent: int, name: str, shown: str) -> PathRefused:
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    except OSError:
        return PathRefused(f"{shown}: {err.strerror}")
    if stat.S_ISLNK(mode) or err.errno == errno.ELOOP:
        return PathRefused(f"{shown} is a symbolic link; file tools do not follow symlinks")
    if err.errno == errno.ENOTDIR:
        if stat.S_ISDIR(mode):  # it was something else a moment ago (a symlink, swapped back)
            return PathRefused(f"{shown} changed while it was opened; file tools do not follow symlinks")
        return PathRefused(f"{shown} is not a directory")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return PathRefused(f"{shown} is not a regular file")
    return PathRefused(f"{shown}: {err.strerror}")


def _walk(root: Path, parts: list[str], *, create: bool) -> int:
    """A directory fd for `parts` below `root` (the root itself is trusted configuration)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for i, name in enumerate(parts):
        with _fd(fd) as parent:
            fd = _step(parent, name, "/".join(parts[: i + 1]), create=create)
    return fd


def read_capped(root: Path, path: str, cap: int, offset: int = 0) -> tuple[bytes, int]:
    """At most `cap + 1` bytes of a regular file in the workspace from `offset`, and the file's size.

    The caller sees the file was cut when more than `cap` bytes came back; memory stays
    bounded by the cap whatever the file's size (a sparse 300 MB file reads as fast as a small one).
    """
    parts = parts_of(path)
    if not parts:
        raise PathRefused(f"{path!r} is the workspace itself, not a file")
    with _fd(_walk(root, parts[:-1], create=False)) as parent:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            raise PathRefused(f"no such file: {path}") from None
        except OSError as err:
            raise _refusal(err, parent, parts[-1], path) from None
    with _fd(fd):
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"{path} is not a regular file")
        os.lseek(fd, offset, os.SEEK_SET)
        chunks: list[bytes] = []
        left = cap + 1
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), info.st_size


def write_file(root: Path, path: str, data: bytes) -> None:
    """Create or replace a regular file in the workspace, making missing directories; never through a symlink."""
    parts = parts_of(path)
    if not parts:
        raise PathRefused(f"{path!r} is the workspace itself, not a file")
    with _fd(_walk(root, parts[:-1], create=True)) as parent:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o666, dir_fd=parent)
        except OSError as err:
            raise _refusal(err, parent, parts[-1], path) from None
    with _fd(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathRefused(f"{path} is not a regular file")
        os.ftruncate(fd, 0)  # only now: a FIFO or device is never truncated or written
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def copy_tree(source: Path, target: Path) -> None:
    """Copy a workspace: directories, regular files (permission bits only, no setuid) and symlinks
    (as links, never followed). FIFOs, sockets and devices are left out. `target` must not exist;
    a missing `source` gives an empty copy."""
    os.mkdir(target, 0o700)
    try:
        src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    with _fd(src), _fd(os.open(target, _DIR_FLAGS)) as dst:
        _copy_dir(src, dst)


def _copy_dir(src: int, dst: int) -> None:
    with os.scandir(src) as entries:
        names = [(e.name, e.stat(follow_symlinks=False).st_mode) for e in entries]
    for name, mode in names:
        if stat.S_ISDIR(mode):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=src)
            except OSError:
                continue  # swapped for something else meanwhile: not copied
            os.mkdir(name, 0o700, dir_fd=dst)
            with _fd(child), _fd(os.open(name, _DIR_FLAGS, dir_fd=dst)) as out:
                _copy_dir(child, out)
                os.chmod(out, stat.S_IMODE(mode) & 0o777 | 0o700)
        elif stat.S_ISLNK(mode):
            with contextlib.suppress(OSError):
                os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        elif stat.S_ISREG(mode):
            _copy_file(src, dst, name)


def _copy_file(src: int, dst: int, name: str) -> None:
    try:
        fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src)
    except OSError:
        return
    with _fd(fin):
        info = os.fstat(fin)
        if not stat.S_ISREG(info.st_mode):
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with _fd(os.open(name, flags, stat.S_IMODE(info.st_mode) & 0o777, dir_fd=dst)) as fout:
            while chunk := os.read(fin, _CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view) :]


def hand_over(root: Path, uid: int, gid: int) -> None:
    """Make everything in `root` belong to `uid:gid`, never following a symlink (`os.fwalk` opens
    each directory it enters and checks it is the one it listed). For a root agent whose sandbox
    runs commands as an unprivileged uid: files the agent or a copy made are then writable there."""
    with _fd(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as top:
        _own(top, ".", uid, gid)
        for _, dirs, files, fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in (*dirs, *files):
                _own(fd, name, uid, gid)


def _own(dir_fd: int, name: str, uid: int, gid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (info.st_uid, info.st_gid) != (uid, gid):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
