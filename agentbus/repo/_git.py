"""Running git: a clean environment, explicit directories, retries on git's own locks; the repository."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentbus.errors import AgentBusError, UsageError

logger = logging.getLogger("agentbus.repo")

BRANCH_PREFIX = "agentbus/"
GIT_TIMEOUT_S = 300.0
STAT_CAP = 4000  # characters of `git diff --stat` kept in an event
LOCK_RETRIES = 12  # about 8 s in all: git's locks are held for milliseconds
_BUSY = re.compile(r"\.lock'?:? File exists|could not lock config file|Unable to create '[^']*\.lock'")
_HEX = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
LOCKS_DIR = ".agentbus-locks"  # beside the worktrees: a session's lock, shared by every agent of the workdir


class GitError(AgentBusError):
    """A git command failed (its message, one line); `busy` when only a lock stood in the way."""

    def __init__(self, message: str, *, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


class RepoUnusable(UsageError):
    """A repository or ref that cannot be used: not a repository, no such ref, a dirty main checkout."""


class MergeConflict(GitError):
    """A merge that would conflict; `files` are the paths in conflict. Nothing was changed."""

    def __init__(self, branch: str, into: str, files: Sequence[str]) -> None:
        shown = ", ".join(files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
        super().__init__(f"merging {branch} into {into} would conflict in {len(files)} file(s): {shown}")
        self.files = tuple(files)


def branch_of(session_id: str) -> str:
    return f"{BRANCH_PREFIX}{session_id}"


def is_commit_id(text: str) -> bool:
    return bool(_HEX.fullmatch(text))


# --- running git --------------------------------------------------------------------------------


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(LC_ALL="C", LANG="C", GIT_TERMINAL_PROMPT="0", GIT_OPTIONAL_LOCKS="0", GIT_PAGER="cat")
    env.update(extra or {})
    return env


def _argv(args: Sequence[str], git_dir: Path | None, work_tree: Path | None, config: Sequence[str] = ()) -> list[str]:
    argv = ["git", "-c", "safe.directory=*", "-c", "core.quotePath=false"]
    for item in config:
        argv += ["-c", item]
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    return [*argv, *args]


def _failure(args: Sequence[str], code: int, err: bytes) -> GitError:
    text = err.decode(errors="replace").strip()
    lines = [ln.removeprefix("fatal: ").removeprefix("error: ") for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else f"exit code {code}"
    return GitError(f"git {args[0]}: {first}", busy=bool(_BUSY.search(text)))


@dataclass(frozen=True)
class Done:
    """A git command's outcome."""

    code: int
    out: str
    err: str


def git_sync(args: Sequence[str], *, cwd: Path | None = None, git_dir: Path | None = None, check: bool = True) -> Done:
    """Run git to the end (startup checks and people's commands); raises GitError unless `check` is off."""
    try:
        proc = subprocess.run(
            _argv(args, git_dir, None), cwd=cwd, env=_env(), capture_output=True, stdin=subprocess.DEVNULL,
            timeout=GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise RepoUnusable("git is not installed (it is needed for pools with a repository)") from None
    if check and proc.returncode != 0:
        raise _failure(args, proc.returncode, proc.stderr)
    return Done(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


async def git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    git_dir: Path | None = None,
    work_tree: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    check: bool = True,
    retries: int = LOCK_RETRIES,
    config: Sequence[str] = (),
) -> Done:
    """Run git; a lock held by another git process is waited out (with backoff), anything else raises."""
    argv = _argv(args, git_dir, work_tree, config)
    for attempt in range(retries + 1):
        done = await _git_once(argv, cwd, env, stdin)
        if done.code == 0 or not check:
            return done
        err = _failure(args, done.code, done.err.encode())
        if not err.busy or attempt == retries:
            raise err
        delay = min(0.05 * 2**attempt, 1.0)
        logger.info("git %s: a lock is busy (%s); retrying in %.2fs", args[0], err, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def _git_once(argv: Sequence[str], cwd: Path | None, env: Mapping[str, str] | None, stdin: bytes | None) -> Done:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=_env(env),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    except FileNotFoundError:
        raise GitError("git is not installed (it is needed for pools with a repository)") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), GIT_TIMEOUT_S)
    except BaseException:  # a timeout, or the run being cancelled: never leave git running behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return Done(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


# --- the repository -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Repo:
    """A repository agentbus works on: its top directory and its (common) git directory."""

    top: Path
    git_dir: Path
    bare: bool = False

    @classmethod
    def open(cls, path: str | Path) -> Repo:
        """The repository at `path` (its top directory, or a bare repository); RepoUnusable otherwise."""
        where = Path(path).expanduser()
        if not where.is_dir():
            raise RepoUnusable(f"repository {path}: no such directory")
        done = git_sync(["rev-parse", "--is-bare-repository", "--git-common-dir"], cwd=where, check=False)
        if done.code != 0:
            raise RepoUnusable(f"{path} is not a git repository")
        bare_text, common = done.out.split("\n")[:2]
        git_dir = (where / common).resolve()
        if bare_text == "true":
            return cls(top=where.resolve(), git_dir=git_dir, bare=True)
        top = Path(git_sync(["rev-parse", "--show-toplevel"], cwd=where).out.strip()).resolve()
        if top != where.resolve():
            raise RepoUnusable(f"{path} is inside the git repository {top}; name its top directory")
        if git_dir != (top / ".git").resolve():
            raise RepoUnusable(f"{path} is a linked worktree of {git_dir.parent}; name the main repository")
        return cls(top=top, git_dir=git_dir)

    def resolve_sync(self, rev: str) -> str:
        """The commit a ref or revision names; RepoUnusable when it names none."""
        check_rev(rev)
        done = git_sync(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                        git_dir=self.git_dir, check=False)  # fmt: skip
        if done.code != 0:
            raise RepoUnusable(f"base {rev!r} does not exist in {self.top}")
        return done.out.strip()

    async def resolve(self, rev: str) -> str:
        check_rev(rev)
        done = await git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                         git_dir=self.git_dir, check=False)  # fmt: skip
        if done.code != 0:
            raise RepoUnusable(f"base {rev!r} does not exist in {self.top}")
        return done.out.strip()

    def default_base(self) -> str:
        """The branch the main checkout is on (what `git clone` would check out), or its commit if detached."""
        done = git_sync(["symbolic-ref", "--quiet", "--short", "HEAD"], git_dir=self.git_dir, check=False)
        return done.out.strip() if done.code == 0 else self.resolve_sync("HEAD")

    def check_clean(self) -> None:
        """A main checkout with uncommitted changes to tracked files is refused: sessions branch from
        commits (the changes would silently be missing), and a merge into its branch needs it clean."""
        if self.bare:
            return
        dirty = _dirty(git_sync(["status", "--porcelain", "--untracked-files=no"], cwd=self.top).out)
        if dirty:
            raise RepoUnusable(
                f"{self.top} has uncommitted changes in its main checkout ({_some(dirty)}); commit or stash them"
            )

    def describe(self) -> str:
        return str(self.top)


def open_for_pool(path: str | Path, base: str | None) -> tuple[Repo, str]:
    """A pool's repository and its base, checked: a repository, a base that exists, a clean checkout."""
    repo = Repo.open(path)
    base = base or repo.default_base()
    repo.resolve_sync(base)
    repo.check_clean()
    return repo, base


def check_rev(rev: str) -> None:
    """A ref or revision name git will not read as an option, on one line."""
    if not rev or rev.startswith("-") or len(rev) > 255 or any(c.isspace() or ord(c) < 32 for c in rev):
        raise RepoUnusable(f"base {rev!r} is not a ref or commit name")


def _dirty(porcelain: str) -> list[str]:
    return [line[3:] for line in porcelain.splitlines() if line.strip()]


def _some(paths: Sequence[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
