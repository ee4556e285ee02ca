"""A session's worktree: made, found, listed, removed, and locked while an agent works in it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentbus.repo._git import BRANCH_PREFIX, LOCKS_DIR, Done, GitError, Repo, git
from agentbus.subjects import valid_token

logger = logging.getLogger("agentbus.repo")


# --- worktrees ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worktree:
    """One session's checkout: its directory, its private git directory, its branch."""

    repo: Repo
    path: Path
    git_dir: Path
    branch: str

    async def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        check: bool = True,
    ) -> Done:
        """git on this worktree alone: its own git directory and work tree, named explicitly. The files
        are the model's: no fsmonitor (a command from a config) runs for them, here or in a nested
        repository a model made."""
        return await git(args, cwd=self.path, git_dir=self.git_dir, work_tree=self.path, env=env, stdin=stdin,
                         check=check, config=("core.fsmonitor=false",))  # fmt: skip

    def restore_pointer(self) -> None:
        """Put back the `.git` file git's own bookkeeping expects (the model may have changed it)."""
        pointer = self.path / ".git"
        want = f"gitdir: {self.git_dir}\n"
        with contextlib.suppress(FileNotFoundError):
            if pointer.is_symlink() or pointer.is_file():
                if not pointer.is_symlink() and pointer.read_text(errors="replace") == want:
                    return
                pointer.unlink()
            elif pointer.is_dir():
                shutil.rmtree(pointer)
        pointer.write_text(want)


@dataclass(frozen=True)
class Listed:
    """One entry of `git worktree list`."""

    path: Path
    branch: str = ""  # without refs/heads/
    head: str = ""
    locked: bool = False
    prunable: bool = False

    @property
    def session_id(self) -> str | None:
        sid = self.branch.removeprefix(BRANCH_PREFIX)
        return sid if self.branch.startswith(BRANCH_PREFIX) and valid_token(sid) else None


async def worktrees(repo: Repo) -> list[Listed]:
    done = await git(["worktree", "list", "--porcelain"], git_dir=repo.git_dir)
    found: list[Listed] = []
    for block in done.out.strip().split("\n\n"):
        fields = dict([*line.split(" ", 1), ""][:2] for line in block.splitlines() if line)
        if "worktree" in fields:
            found.append(
                Listed(
                    path=Path(fields["worktree"]),
                    branch=fields.get("branch", "").removeprefix("refs/heads/"),
                    head=fields.get("HEAD", ""),
                    locked="locked" in fields,
                    prunable="prunable" in fields,
                )
            )
    return found


def private_git_dir(repo: Repo, path: Path) -> Path | None:
    """The repository's own record of the worktree at `path` (`.git/worktrees/<name>`), found from the
    repository's metadata alone: each entry's `gitdir` file names the worktree it belongs to."""
    want = os.path.realpath(path)
    admin = repo.git_dir / "worktrees"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(admin.iterdir()):
            with contextlib.suppress(OSError):
                named = Path((entry / "gitdir").read_text().strip())
                if os.path.realpath(named.parent) == want:
                    return entry
    return None


async def ensure_worktree(repo: Repo, path: Path, branch: str, base_commit: str | None) -> tuple[Worktree, bool]:
    """The worktree at `path` on `branch`: found, re-made from the branch, or made with a new branch
    from `base_commit`. Returns it and whether the branch was made now."""
    here = _entry(await worktrees(repo), path)
    if here is not None and here.branch != branch:
        raise GitError(f"{path} is a worktree of {repo.top} on {here.branch or 'a detached HEAD'}, not {branch}")
    if here is not None and _contents(path) == "missing":  # its directory went away: forget it, make it again
        await git(["worktree", "unlock", str(path)], git_dir=repo.git_dir, check=False)
        await git(["worktree", "prune"], git_dir=repo.git_dir)
        here = None
    created = False
    if here is None:
        if _contents(path) == "some":
            raise GitError(f"{path} exists and is not a worktree of {repo.top}")
        exists = (await git(["show-ref", "--verify", "--quiet", f"refs/heads/{branch}"], git_dir=repo.git_dir,
                            check=False)).code == 0  # fmt: skip
        lock = ["--lock", "--reason", f"agentbus session {path.name}"]
        if exists:
            await git(["worktree", "add", *lock, str(path), branch], git_dir=repo.git_dir)
        else:
            if base_commit is None:
                raise GitError(f"branch {branch} does not exist and no base was given")
            await git(["worktree", "add", *lock, "-b", branch, str(path), base_commit], git_dir=repo.git_dir)
            created = True
    gd = private_git_dir(repo, path)
    if gd is None:
        raise GitError(f"{repo.top} has no record of the worktree {path}")
    wt = Worktree(repo=repo, path=path, git_dir=gd, branch=branch)
    _settle(wt)
    return wt, created


def _entry(listed: Sequence[Listed], path: Path) -> Listed | None:
    want = os.path.realpath(path)
    return next((w for w in listed if os.path.realpath(w.path) == want), None)


def _contents(path: Path) -> str:
    """ "missing", "empty" or "some": what is at a worktree's path."""
    if not path.is_dir():
        return "missing"
    return "some" if any(path.iterdir()) else "empty"


def _settle(wt: Worktree) -> None:
    """A worktree this run now owns: an `index.lock` left there belongs to a git killed with an earlier
    run of the session (nobody else works in it), and the `.git` pointer is put back."""
    with contextlib.suppress(FileNotFoundError):
        (wt.git_dir / "index.lock").unlink()
    wt.restore_pointer()


async def remove_worktree(repo: Repo, path: Path) -> bool:
    """Remove a clean worktree (its branch stays); False when the repository has none at `path`.

    A worktree with uncommitted changes or untracked files (a commit a hook refused) is kept and
    GitError says so: nothing agentbus removes by itself loses work. Ignored files do not count.
    """
    if _entry(await worktrees(repo), path) is None:
        return False
    if _contents(path) == "missing":
        await git(["worktree", "unlock", str(path)], git_dir=repo.git_dir, check=False)
        await git(["worktree", "prune"], git_dir=repo.git_dir)
        return True
    await git(["worktree", "unlock", str(path)], git_dir=repo.git_dir, check=False)
    done = await git(["worktree", "remove", str(path)], git_dir=repo.git_dir, check=False)
    if done.code != 0:
        await git(["worktree", "lock", "--reason", f"agentbus session {path.name}", str(path)], git_dir=repo.git_dir,
                  check=False)  # fmt: skip
        raise GitError(f"worktree {path} kept: it has uncommitted changes (git worktree remove --force discards them)")
    return True


@contextlib.asynccontextmanager
async def session_lock(workdir: Path, session_id: str, *, wait: bool = True) -> AsyncIterator[bool]:
    """The lock that keeps a session's worktree from being removed while a run makes or reuses it
    (`flock` on `<workdir>/.agentbus-locks/<session>.lock`). Yields False without it when `wait`
    is off and another process holds it."""
    locks = workdir / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{session_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            if wait:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            else:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock
