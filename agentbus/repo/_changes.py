"""What sessions changed: commits, diffs, checkouts of a commit, and merges."""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentbus.errors import UsageError
from agentbus.repo._git import (
    STAT_CAP,
    GitError,
    MergeConflict,
    Repo,
    RepoUnusable,
    _dirty,
    _failure,
    _some,
    git,
    is_commit_id,
)
from agentbus.repo._worktrees import Worktree, private_git_dir, worktrees

logger = logging.getLogger("agentbus.repo")

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
