"""Sessions' branches, for people: a session's diff, merging it (the one explicit step), worktrees left
behind, and a `--base` checked at submit.

Where a branch lives comes from the session's log (`branch_created`, `changes_committed`): the
repository's path as the agent saw it. These run git on that path here, so run them where the
repository is on the same path (every worker of the pool must see it there too), or name it
with `--repo`. Nothing here merges or pushes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from agentbus.control import new_event_id
from agentbus.errors import NoSuchSession, NotPermitted, UsageError
from agentbus.messages import BranchCreated, BranchMerged, ChangesCommitted, WorkerInfo
from agentbus.repo import (
    GitError,
    Listed,
    Repo,
    RepoUnusable,
    diff,
    git,
    identity,
    is_commit_id,
    merge,
    remove_worktree,
    session_lock,
    worktrees,
)
from agentbus.session import SessionLog

logger = logging.getLogger("agentbus.branches")


@dataclass(frozen=True)
class SessionBranch:
    """A session's branch as its log records it, in a repository opened here."""

    session_id: str
    repo: Repo
    branch: str
    base: str
    base_commit: str
    commit: str  # the last commit recorded on it ("" before the first)


async def session_branch(log: SessionLog, session_id: str, repo_path: str | None = None) -> SessionBranch:
    records = await log.read(session_id)
    if not records:
        raise NoSuchSession(session_id)
    created = [r.event for r in records if isinstance(r.event, BranchCreated)]
    if not created:
        raise UsageError(f"session {session_id} works on no repository (its pool names none)")
    commits = [r.event for r in records if isinstance(r.event, ChangesCommitted)]
    where = repo_path or created[-1].repo
    try:
        repo = await asyncio.to_thread(Repo.open, where)
    except RepoUnusable as err:
        raise RepoUnusable(f"{err} (run this where the repository is, or name it with --repo)") from None
    branch = created[-1].branch
    found = await git(["show-ref", "--verify", "--quiet", f"refs/heads/{branch}"], git_dir=repo.git_dir, check=False)
    if found.code != 0:
        raise RepoUnusable(f"{repo.top} has no branch {branch} (deleted, or another repository)")
    return SessionBranch(
        session_id=session_id, repo=repo, branch=branch, base=created[-1].base, base_commit=created[-1].base_commit,
        commit=commits[-1].commit if commits else "",
    )  # fmt: skip


async def session_diff(
    log: SessionLog, session_id: str, *, stat: bool = False, repo_path: str | None = None, color: bool = False
) -> str:
    """What the session's branch changed, from where it started to its last recorded commit."""
    b = await session_branch(log, session_id, repo_path)
    if not b.commit:
        raise UsageError(f"session {session_id} has committed nothing on {b.branch} yet")
    return await diff(b.repo, b.base_commit, b.commit, stat=stat, color=color)


async def merge_session(
    log: SessionLog, session_id: str, *, into: str | None = None, repo_path: str | None = None
) -> BranchMerged:
    """Merge an ended session's branch into its base (or `into`), then record it in the session's log.

    A fast-forward when the base has not moved, else a merge commit; a conflict changes nothing and
    raises MergeConflict naming the files.
    """
    ident = log.bus.identity
    if ident.role in ("codriver", "observer"):  # checked first: the merge must not happen unrecorded
        raise NotPermitted("merge (recorded on the session's control channel)", user=ident.user, role=ident.role)
    state = await log.state(session_id)
    if not state.terminal:
        raise UsageError(f"session {session_id} is {state.status}; merge its branch once it has ended")
    b = await session_branch(log, session_id, repo_path)
    if not b.commit:
        raise UsageError(f"session {session_id} has committed nothing on {b.branch}; there is nothing to merge")
    target = into or b.base
    if not target or is_commit_id(target):
        raise UsageError(f"the session's base {target!r} is a commit, not a branch: say --into BRANCH")
    user = log.bus.user
    committer = await identity(b.repo, (f"{user} (agentbus)", f"{user}@agentbus.invalid"))
    message = f"Merge {b.branch} into {target}\n\nagentbus session {session_id}: {state.prompt[:200]}\n"
    merged = await merge(b.repo, b.branch, target, message=message, committer=committer)
    event = BranchMerged(
        id=new_event_id("merged"), branch=b.branch, commit=merged.commit, into=target, result=merged.result,
        fast_forward=merged.fast_forward,
    )  # fmt: skip
    await log.append(session_id, event, channel="control")
    return event


@dataclass(frozen=True)
class Pruned:
    repo: Path
    worktree: Path
    session_id: str
    why: str
    kept: str = ""  # why it was not removed (uncommitted changes)


async def prune(log: SessionLog, repos: list[Repo]) -> list[Pruned]:
    """Remove the worktrees of sessions that ended, or that the log no longer has; their branches stay.
    A session still running keeps its worktree, and so does one a run holds the lock of; one with
    uncommitted changes is kept and listed with `kept` saying so."""
    pruned = []
    for repo in repos:
        for listed in await worktrees(repo):
            sid = listed.session_id
            if sid is None:
                continue
            why = await _gone(log, sid)
            if not why:
                continue
            try:
                if await _remove(repo, listed, sid):
                    pruned.append(Pruned(repo.top, listed.path, sid, why))
            except GitError as err:
                pruned.append(Pruned(repo.top, listed.path, sid, why, kept=str(err)))
    return pruned


async def _gone(log: SessionLog, session_id: str) -> str:
    if not await log.exists(session_id):
        return "not in the log"
    state = await log.state(session_id)
    return state.status if state.terminal else ""


async def _remove(repo: Repo, listed: Listed, session_id: str) -> bool:
    try:
        async with session_lock(listed.path.parent, session_id, wait=False) as held:
            return held and await remove_worktree(repo, listed.path)
    except OSError:  # the workdir is not ours to write a lock in: remove without it
        return await remove_worktree(repo, listed.path)


def announced_repos(workers: list[WorkerInfo]) -> list[Repo]:
    """The repositories live agents work on, those of them this machine sees at the same path."""
    found: list[Repo] = []
    for path in sorted({w.repo for w in workers if w.repo}):
        with contextlib.suppress(RepoUnusable, GitError):
            found.append(Repo.open(path))
    return found


def check_base(workers: list[WorkerInfo], pool: str, base: str) -> None:
    """`submit --base` on a pool: refused at once when the pool's live agents work on no repository,
    or on one this machine sees that has no such ref. With no agent to ask, the agent that takes the
    session checks it (and ends the session `failed`, with the reason, if it does not exist)."""
    mine = [w for w in workers if w.pool == pool]
    if not mine:
        return
    paths = {w.repo for w in mine}
    if paths == {""}:
        raise UsageError(f"--base {base!r}: pool {pool} works on no repository")
    for path in sorted(paths - {""}):
        try:
            repo = Repo.open(path)
        except RepoUnusable:
            continue  # on another machine: its agent checks
        repo.resolve_sync(base)
