"""File tools without races: every path is walked one directory at a time, no symlink is ever
followed, and a read takes at most the cap whatever the file's size."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentbus.workspace import (
    PathRefused,
    copy_tree,
    hand_over,
    parts_of,
    read_capped,
    session_workspace,
    write_file,
)
from services.agent.tools import READ_CAP, ReadFile, ToolContext, ToolError, WriteFile


def _ctx(tmp_path: Path) -> ToolContext:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ToolContext(session_id="s1", workspace=ws, step=1, tool_use_id="tu1")


async def test_read_file_of_a_300_mb_file_returns_the_cap_and_says_the_file_was_cut(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with (ctx.workspace / "huge.log").open("wb") as f:
        f.write(b"first line\n")
        f.truncate(300 << 20)  # sparse: 300 MB to read, nothing on disk
    tracemalloc.start()
    try:
        out = await ReadFile().run({"path": "huge.log"}, ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.startswith("first line\n")
    assert f"file cut: bytes 0-{READ_CAP} of {300 << 20} shown; read on with offset {READ_CAP}" in out
    assert len(out) < READ_CAP + 200
    assert peak < 2 << 20, f"reading took {peak} bytes of memory"
    more = await ReadFile().run({"path": "huge.log", "offset": (300 << 20) - 5}, ctx)
    assert more == "\0" * 5, "the last bytes, read on from an offset"


@pytest.mark.parametrize("target", ["/etc", "outside"])
async def test_a_symlink_at_a_path_component_is_refused_for_reads_and_writes(tmp_path: Path, target: str) -> None:
    ctx = _ctx(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("OUTSIDE")
    os.symlink("/etc" if target == "/etc" else outside, ctx.workspace / "sub")
    with pytest.raises(ToolError, match="sub is a symbolic link; file tools do not follow symlinks"):
        await ReadFile().run({"path": "sub/passwd"}, ctx)
    with pytest.raises(ToolError, match="symbolic link"):
        await WriteFile().run({"path": "sub/new.txt", "content": "x"}, ctx)
    with pytest.raises(ToolError, match="symbolic link"):
        await WriteFile().run({"path": "sub/deeper/new.txt", "content": "x"}, ctx)
    assert sorted(os.listdir(outside)) == ["passwd"]


async def test_a_write_never_follows_a_final_symlink(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    os.symlink(victim, ctx.workspace / "link.txt")
    with pytest.raises(ToolError, match=r"link\.txt is a symbolic link"):
        await WriteFile().run({"path": "link.txt", "content": "overwritten"}, ctx)
    assert victim.read_text() == "untouched"


async def test_a_fifo_is_neither_read_nor_written(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    os.mkfifo(ctx.workspace / "pipe")
    with pytest.raises(ToolError, match="not a regular file"):
        await ReadFile().run({"path": "pipe"}, ctx)
    with pytest.raises(ToolError, match="not a regular file"):
        await WriteFile().run({"path": "pipe", "content": "x"}, ctx)


def _exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): both names exist at every instant, their targets swap atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


@contextmanager
def _swapping(workspace: Path, outside: Path) -> Iterator[None]:
    """A thread that keeps swapping `workspace/d` between a real directory and a symlink to `outside`."""
    stop = threading.Event()
    os.symlink(outside, workspace / "d.link")

    def swap() -> None:
        while not stop.is_set():
            _exchange(workspace / "d", workspace / "d.link")

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_a_symlink_swapped_in_while_reading_and_writing_never_leads_outside(tmp_path: Path) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    (workspace / "d").mkdir(parents=True)
    outside.mkdir()
    (workspace / "d" / "f.txt").write_text("inside")
    (outside / "f.txt").write_text("OUTSIDE")
    seen: set[str] = set()
    with _swapping(workspace, outside):
        for i in range(1500):
            try:
                seen.add(read_capped(workspace, "d/f.txt", 100)[0].decode())
            except PathRefused as err:
                assert "do not follow symlinks" in str(err)
                seen.add("refused")
            with contextlib.suppress(PathRefused):
                write_file(workspace, f"d/new{i}.txt", b"x")
    assert "OUTSIDE" not in seen
    assert seen == {"inside", "refused"}, "the race ran both ways, and nothing else happened"
    assert sorted(os.listdir(outside)) == ["f.txt"], "nothing was written through the swapped-in symlink"


def test_paths_are_split_lexically_and_may_not_climb_out() -> None:
    assert parts_of("a/./b//c") == ["a", "b", "c"]
    assert parts_of("a/../b") == ["b"]
    for bad in ("../x", "/etc/passwd", "a/../../x", ".."):
        with pytest.raises(PathRefused, match="outside the session workspace"):
            parts_of(bad)


def test_a_session_workspace_is_found_under_the_root_and_never_outside(tmp_path: Path) -> None:
    assert session_workspace(tmp_path, "s-1") == tmp_path.resolve() / "s-1"
    for bad in ("..", "a/b", "../etc", ""):
        with pytest.raises(PathRefused):
            session_workspace(tmp_path, bad)
    os.symlink("/etc", tmp_path / "evil")
    with pytest.raises(PathRefused, match="outside"):
        session_workspace(tmp_path, "evil")


def test_a_workspace_copy_keeps_files_dirs_and_links_and_leaves_out_fifos_and_setuid(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("data")
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o4755)
    os.symlink("/etc/passwd", src / "link")
    os.mkfifo(src / "pipe")
    copy_tree(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert (dst / "d" / "f.txt").read_text() == "data"
    assert os.readlink(dst / "link") == "/etc/passwd"
    assert not (dst / "pipe").exists()
    assert (dst / "run.sh").stat().st_mode & 0o7777 == 0o755
    copy_tree(tmp_path / "missing", tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_handing_a_workspace_over_changes_owners_without_following_symlinks(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "d").mkdir(parents=True)
    (ws / "d" / "f").write_text("x")
    victim = tmp_path / "victim"
    victim.write_text("root's")
    os.symlink(victim, ws / "link")
    hand_over(ws, 65534, 65534)
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in (ws, ws / "d", ws / "d" / "f", ws / "link")} == {
        (65534, 65534)
    }
    assert victim.stat().st_uid == 0
    shutil.rmtree(ws)
