"""Git for sessions that work on a repository: worktrees, commits, diffs, checkouts and merges.

Real git (2.38 or later: merges use `git merge-tree --write-tree`), run as a subprocess with a
clean environment (no inherited `GIT_*`), `LC_ALL=C` so its messages can be read, no prompts,
and `safe.directory=*`: the paths are this process's own configuration, never a path a model
chose, and an agent whose sandbox runs commands as another uid hands the worktree to it.

Every command on a session's worktree names its git directory and work tree explicitly
(`--git-dir <repo>/.git/worktrees/<name> --work-tree <worktree>`), found from the repository's
own metadata. The `.git` file inside the worktree is writable by the model, so it is never read
to decide where git looks: a model that rewrote it could otherwise point the agent's git at
another repository, or at a directory with a config of its own (`core.fsmonitor` runs commands).

Git's own locks (`index.lock`, a ref's `.lock`, `packed-refs.lock`, `config.lock`) are taken by
concurrent sessions on one repository and by git's background maintenance: a command that finds
one busy is retried with backoff for a few seconds before it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agentbus.errors import AgentBusError, UsageError
from agentbus.subjects import valid_token

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


# --- commits and diffs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """What a range of commits changed."""

    files: int = 0
    insertions: int = 0
    deletions: int = 0
    text: str = ""  # `git diff --stat`

    def short(self) -> str:
        return f"{self.files} file{'s' if self.files != 1 else ''} changed, +{self.insertions} -{self.deletions}"


async def commit_all(wt: Worktree, message: str, author: tuple[str, str]) -> str | None:
    """Stage everything in the worktree and commit it on its branch; the new commit, or None when
    nothing changed. A refusal (a hook, a signing failure) raises GitError with git's reason."""
    wt.restore_pointer()
    await wt.run(["add", "--all", "."])
    if (await wt.run(["diff", "--cached", "--quiet"], check=False)).code == 0:
        return None
    name, email = author
    env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
           "GIT_COMMITTER_EMAIL": email}  # fmt: skip
    done = await wt.run(["commit", "--quiet", "--file=-"], env=env, stdin=message.encode(), check=False)
    if done.code != 0:
        output = (done.err + "\n" + done.out).strip()
        lines = [ln for ln in output.splitlines() if ln.strip()]
        raise GitError("commit refused: " + (" / ".join(lines[-5:])[:1000] if lines else f"exit code {done.code}"))
    return await head(wt)


async def head(wt: Worktree) -> str:
    return (await wt.run(["rev-parse", "--verify", "HEAD"])).out.strip()


async def message_of(repo: Repo, commit: str) -> str:
    return (await git(["log", "-1", "--format=%B", commit, "--"], git_dir=repo.git_dir)).out


async def diff_stat(repo: Repo, base: str, commit: str) -> Stat:
    short = (await git(["diff", "--shortstat", base, commit, "--"], git_dir=repo.git_dir)).out
    numbers = {k: int(n) for n, k in re.findall(r"(\d+) (file|insertion|deletion)", short)}
    text = (await git(["diff", "--stat=100", base, commit, "--"], git_dir=repo.git_dir)).out.rstrip()
    if len(text) > STAT_CAP:
        text = text[:STAT_CAP] + "\n... [stat cut]"
    return Stat(numbers.get("file", 0), numbers.get("insertion", 0), numbers.get("deletion", 0), text)


async def diff(repo: Repo, base: str, commit: str, *, stat: bool = False, color: bool = False) -> str:
    args = ["diff", f"--color={'always' if color else 'never'}", *(["--stat"] if stat else []), base, commit, "--"]
    return (await git(args, git_dir=repo.git_dir)).out


async def checkout_commit(repo: Repo, commit: str, target: Path) -> None:
    """Write the files of `commit` into `target` (a new directory), as a checkout would, touching
    nothing in the repository: a temporary index, outside `target`."""
    if not is_commit_id(commit):
        raise GitError(f"{commit!r} is not a commit id")
    with tempfile.TemporaryDirectory(prefix="agentbus-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        await git(["read-tree", commit], git_dir=repo.git_dir, env=env)
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        await git(["checkout-index", "--all", "--force", f"--prefix={target}/"], git_dir=repo.git_dir, env=env)


def verified(repo_path: str, workspace: Path) -> Repo:
    """The repository a session's log names, accepted only if it has a worktree registered at
    `workspace` (a path from the reader's own configuration): a forged path leads nowhere."""
    try:
        repo = Repo.open(repo_path)
    except UsageError as err:
        raise GitError(str(err)) from None
    if private_git_dir(repo, workspace) is None:
        raise GitError(f"{repo.top} has no worktree at {workspace}")
    return repo


# --- merging ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Merged:
    """A merge done: `into` now points at `result` (the branch's commit itself when fast-forwarded)."""

    into: str
    commit: str
    result: str
    fast_forward: bool


async def merge(repo: Repo, branch: str, into: str, *, message: str, committer: tuple[str, str]) -> Merged:
    """Merge `branch` into the branch `into`: a fast-forward when possible, else a merge commit.

    Computed without a working tree (`git merge-tree --write-tree`), so a conflict changes nothing
    and raises MergeConflict naming the files. Where `into` is checked out (the main checkout, a
    worktree) that checkout must be clean, and is moved with `git merge --ff-only` to the result;
    elsewhere the ref is moved with a compare-and-swap on its old value.
    """
    ref = f"refs/heads/{into}"
    if (await git(["show-ref", "--verify", "--quiet", ref], git_dir=repo.git_dir, check=False)).code != 0:
        raise RepoUnusable(f"{into!r} is not a branch of {repo.top}; merge into a branch (--into BRANCH)")
    old = (await git(["rev-parse", "--verify", ref], git_dir=repo.git_dir)).out.strip()
    tip = (await git(["rev-parse", "--verify", f"refs/heads/{branch}"], git_dir=repo.git_dir)).out.strip()
    checkout = next((w for w in await worktrees(repo) if w.branch == into and not w.prunable), None)
    if checkout is not None:
        porcelain = (await git(["status", "--porcelain", "--untracked-files=no"], cwd=checkout.path)).out
        if dirty := _dirty(porcelain):
            raise RepoUnusable(f"{checkout.path} (on {into}) has uncommitted changes ({_some(dirty)}); "
                               "commit or stash them first")  # fmt: skip
    ancestor = await git(["merge-base", "--is-ancestor", old, tip], git_dir=repo.git_dir, check=False)
    if ancestor.code == 0:
        result, ff = tip, True
    else:
        result, ff = await _merge_commit(repo, old, tip, message, committer, branch, into), False
    if checkout is not None:
        await git(["merge", "--ff-only", "--quiet", result], cwd=checkout.path)
    else:
        await git(["update-ref", "-m", f"agentbus merge {branch}", ref, result, old], git_dir=repo.git_dir)
    return Merged(into=into, commit=tip, result=result, fast_forward=ff)


async def _merge_commit(
    repo: Repo, old: str, tip: str, message: str, committer: tuple[str, str], branch: str, into: str
) -> str:
    done = await git(["merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", old, tip],
                     git_dir=repo.git_dir, check=False)  # fmt: skip
    parts = [p for p in done.out.split("\0") if p]
    if done.code == 1:
        raise MergeConflict(branch, into, sorted(set(parts[1:])))
    if done.code != 0 or not parts:
        raise _failure(["merge-tree"], done.code, done.err.encode())
    name, email = committer
    env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
           "GIT_COMMITTER_EMAIL": email}  # fmt: skip
    made = await git(["commit-tree", parts[0], "-p", old, "-p", tip, "-F", "-"], git_dir=repo.git_dir, env=env,
                     stdin=message.encode())  # fmt: skip
    return made.out.strip()


async def identity(repo: Repo, fallback: tuple[str, str]) -> tuple[str, str]:
    """The committer git would use in this repository (user.name, user.email), else `fallback`."""
    name = (await git(["config", "user.name"], git_dir=repo.git_dir, check=False)).out.strip()
    email = (await git(["config", "user.email"], git_dir=repo.git_dir, check=False)).out.strip()
    return (name, email) if name and email else fallback


__all__ = [
    "BRANCH_PREFIX",
    "Done",
    "GitError",
    "Listed",
    "MergeConflict",
    "Merged",
    "Repo",
    "RepoUnusable",
    "Stat",
    "Worktree",
    "branch_of",
    "check_rev",
    "checkout_commit",
    "commit_all",
    "diff",
    "diff_stat",
    "ensure_worktree",
    "git",
    "git_sync",
    "head",
    "identity",
    "is_commit_id",
    "merge",
    "message_of",
    "open_for_pool",
    "private_git_dir",
    "remove_worktree",
    "session_lock",
    "verified",
    "worktrees",
]
