"""The agent's side of a pool bound to a repository: each session works in its own `git worktree`.

The worktree, at `<workdir>/<session>` on branch `agentbus/<session>` from the pool's base (or
the task's `base`), is the session's workspace: the file tools, the sandbox (which mounts only it)
and a resumed run all use it. Git itself runs here, on the agent's side, never in the sandbox:
mounting the repository's object store there would show a model every other session's commits.

When a round ends the agent commits what changed and records `changes_committed` (or
`commit_failed` with git's reason) before it hands the session to the evaluator or ends it; an
end that is not a completion commits what is left too, so removing the worktree loses nothing.
The worktree is removed when the session ends (the branch stays), unless it holds changes a
commit could not take (a hook refused): those stay for a person. Worktrees of sessions the
evaluator ended are removed by a sweep every agent of the repository runs.

Hooks, each one line where it is called: `run.py` (prepare at the claim, commit at a round's end,
before and after an end), `calls.py` (a child's branch in the `delegate` result, `read_child_diff`),
`worker.py` (opening the repository at start, the sweep, the registry entry).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agentbus.errors import AgentBusError
from agentbus.messages import (
    BranchCreated,
    ChangesCommitted,
    CommitFailed,
    DelegationRequested,
    Event,
    Record,
    Task,
)
from agentbus.repo import (
    GitError,
    Repo,
    RepoUnusable,
    Stat,
    Worktree,
    branch_of,
    commit_all,
    diff,
    diff_stat,
    ensure_worktree,
    head,
    message_of,
    open_for_pool,
    private_git_dir,
    remove_worktree,
    session_lock,
    worktrees,
)
from agentbus.session import SessionLog
from services.agent.conversation import Conversation
from services.agent.tools import READ_CAP, ToolError

if TYPE_CHECKING:
    from services.agent.run import Outcome, SessionRun

logger = logging.getLogger("agentbus.agent")

SYSTEM_NOTE = (
    " Your workspace is a git worktree of the pool's repository, on a branch of its own. git is not "
    "available to your commands; when you finish, everything you changed is committed on that branch "
    "for a person to review and merge."
)
_MESSAGE_CAP = 4000


@dataclass(frozen=True)
class SessionRepos:
    """One agent's repository: a worktree per session under `workdir`, branched from `base`."""

    repo: Repo
    base: str
    review: bool
    workdir: Path
    pool: str

    @classmethod
    def open(cls, path: str, base: str | None, *, review: bool, workdir: Path, pool: str) -> SessionRepos:
        """Checked at agent start: a repository, a base that exists, a clean main checkout (RepoUnusable)."""
        repo, base = open_for_pool(path, base)
        return cls(repo=repo, base=base, review=review, workdir=workdir.resolve(), pool=pool)

    def path(self, session_id: str) -> Path:
        return self.workdir / session_id

    def owns(self, worktree: Path) -> bool:
        """A worktree under this agent's workdir (another deployment's, elsewhere, is not its to sweep)."""
        return os.path.realpath(worktree.parent) == str(self.workdir)

    async def worktree(self, session_id: str) -> Worktree | None:
        """The session's worktree if it exists (after `prepare`, until `release`)."""
        path = self.path(session_id)
        git_dir = private_git_dir(self.repo, path)
        if git_dir is None or not path.is_dir():
            return None
        return Worktree(repo=self.repo, path=path, git_dir=git_dir, branch=branch_of(session_id))

    # --- a session's run ---------------------------------------------------------------------------

    async def prepare(self, run: SessionRun, conv: Conversation) -> Outcome | None:
        """Find or make the session's worktree; a failure ends the session `failed` with the reason."""
        assert conv.task is not None
        created = _last(run.records, BranchCreated)
        base = (created.base if created else conv.task.base) or self.base
        failure = ""
        async with session_lock(self.workdir, run.sid):  # a sweep removing it meanwhile waits, then sees it running
            try:
                wt, start = await self._worktree_for(run.sid, created, base)
            except (GitError, RepoUnusable) as err:
                failure = f"no workspace in {self.repo.top}: {err}"
            else:
                if created is None:
                    await run.append(
                        BranchCreated(
                            id="branch", repo=str(self.repo.top), branch=wt.branch, base=base, base_commit=start,
                            worktree=str(wt.path), review=self.review,
                        )
                    )  # fmt: skip
                    await run.refresh()  # the loop and the round's commit read it from the records
        return await run.end("failed", failure) if failure else None  # the end takes the lock itself

    async def _worktree_for(self, sid: str, created: BranchCreated | None, base: str) -> tuple[Worktree, str]:
        """The worktree, and the commit its branch started from."""
        base_commit = created.base_commit if created else await self.repo.resolve(base)
        wt, made = await ensure_worktree(self.repo, self.path(sid), branch_of(sid), base_commit)
        # a branch a run made and died before recording has no commit of its own yet: its head is its start
        return wt, base_commit if made or created else await head(wt)

    async def commit_round(self, run: SessionRun, conv: Conversation) -> None:
        """Commit the round's changes on the branch and record it; once per round, however often run."""
        await self._commit(run, conv, key=f"round-{conv.round}", why=conv.final_text, quiet=False)

    async def before_end(self, run: SessionRun, conv: Conversation, status: str, reason: str) -> None:
        """An end that is not a completion still commits what the run left (nothing is lost on removal)."""
        if status != "completed":
            await self._commit(run, conv, key=f"end-{conv.round}", why=f"session {status}: {reason}", quiet=True)

    async def _commit(self, run: SessionRun, conv: Conversation, *, key: str, why: str, quiet: bool) -> None:
        ids = {f"committed-{key}", f"commit-failed-{key}"}
        if any(getattr(r.event, "id", "") in ids for r in run.records):
            return
        created = _last(run.records, BranchCreated)
        wt = await self.worktree(run.sid)
        if created is None or wt is None:
            return
        assert conv.task is not None
        trailer = f"Agentbus-Commit: {run.sid}/{key}"
        message = commit_message(conv.task, why, self.pool, trailer)
        try:
            commit = await commit_all(wt, message, author(self.pool, run.sid))
            if commit is None:
                commit = await self._unrecorded(run, wt, trailer)
            if commit is None:
                if not quiet:
                    await run.append(_failed(key, "nothing changed in the worktree", wt, await head(wt), conv.round))
                return
            stat = await diff_stat(self.repo, created.base_commit, commit)
        except GitError as err:
            logger.warning("session %s: commit failed: %s", run.sid, err)
            await run.append(_failed(key, str(err), wt, await _head_or_empty(wt), conv.round))
            return
        await run.append(_committed(key, created, commit, stat, conv.round))
        logger.info("session %s: committed %s on %s (%s)", run.sid, commit[:12], wt.branch, stat.short())

    async def _unrecorded(self, run: SessionRun, wt: Worktree, trailer: str) -> str | None:
        """A commit of this round that a run made and died before recording (the branch is ahead of
        the log, and its head carries this round's trailer): recorded now, never made twice."""
        commit = await head(wt)
        recorded = {e.commit for e in _all(run.records, ChangesCommitted)}
        created = _last(run.records, BranchCreated)
        if commit in recorded or (created is not None and commit == created.base_commit):
            return None
        return commit if trailer in (await message_of(self.repo, commit)).splitlines() else None

    async def release(self, session_id: str) -> None:
        """The session ended: its worktree goes (the branch stays). A failure is left to the sweep."""
        try:
            async with session_lock(self.workdir, session_id):
                await remove_worktree(self.repo, self.path(session_id))
        except (GitError, OSError) as err:
            logger.warning("session %s: %s", session_id, err)

    # --- the sweep ---------------------------------------------------------------------------------

    async def sweep(self, log: SessionLog) -> list[str]:
        """Remove the worktrees under this workdir whose sessions ended (or are gone from the log)."""
        removed = []
        for listed in await worktrees(self.repo):
            sid = listed.session_id
            if sid is None or not self.owns(listed.path):
                continue  # not agentbus's, or another deployment's workdir
            async with session_lock(self.workdir, sid, wait=False) as held:
                if held and await ended(log, sid):
                    try:
                        await remove_worktree(self.repo, listed.path)
                    except GitError as err:  # kept for a person (said once, when its session ended)
                        logger.debug("sweep: %s", err)
                        continue
                    removed.append(sid)
        return removed

    async def sweep_forever(self, log: SessionLog, every_s: float) -> None:
        while True:
            try:
                if removed := await self.sweep(log):
                    logger.info("removed the worktrees of ended sessions %s", ", ".join(removed))
            except (AgentBusError, OSError) as err:
                logger.warning("worktree sweep of %s: %s", self.repo.top, err)
            await asyncio.sleep(every_s)


async def ended(log: SessionLog, session_id: str) -> bool:
    """Nothing will run in the session's worktree again: it ended, or the log has no such session."""
    return not await log.exists(session_id) or (await log.state(session_id)).terminal


def commit_message(task: Task, why: str, pool: str, trailer: str) -> str:
    lines = [ln.strip() for ln in task.prompt.strip().splitlines() if ln.strip()]
    subject = lines[0] if lines else f"agentbus session {task.session_id}"
    subject = subject if len(subject) <= 72 else subject[:71] + "…"
    body = why.strip()[:_MESSAGE_CAP]
    trailers = f"Agentbus-Session: {task.session_id}\nAgentbus-Pool: {pool}\n{trailer}"
    return f"{subject}\n\n{body}\n\n{trailers}\n" if body else f"{subject}\n\n{trailers}\n"


def author(pool: str, session_id: str) -> tuple[str, str]:
    """Commits name the pool and the session that made them."""
    return f"agentbus pool {pool} session {session_id}", f"{session_id}@{pool}.agentbus.invalid"


def _committed(key: str, created: BranchCreated, commit: str, stat: Stat, round_: int) -> ChangesCommitted:
    return ChangesCommitted(
        id=f"committed-{key}", repo=created.repo, branch=created.branch, commit=commit, base=created.base,
        base_commit=created.base_commit, round=round_, files_changed=stat.files, insertions=stat.insertions,
        deletions=stat.deletions, stat=stat.text,
    )  # fmt: skip


def _failed(key: str, reason: str, wt: Worktree, head_: str, round_: int) -> CommitFailed:
    return CommitFailed(
        id=f"commit-failed-{key}", reason=reason, repo=str(wt.repo.top), branch=wt.branch, head=head_, round=round_
    )


async def _head_or_empty(wt: Worktree) -> str:
    try:
        return await head(wt)
    except GitError:
        return ""


E = TypeVar("E", bound=Event)


def _all(records: list[Record], kind: type[E]) -> list[E]:
    return [r.event for r in records if isinstance(r.event, kind)]


def _last(records: list[Record], kind: type[E]) -> E | None:
    found = _all(records, kind)
    return found[-1] if found else None


# --- the hooks: each a no-op for a pool without a repository --------------------------------------


def open_repos(path: str | None, base: str | None, *, review: bool, workdir: Path, pool: str) -> SessionRepos | None:
    """At agent start: None without `--repo`; a `--base` without one is a usage error."""
    if path is None:
        if base:
            raise RepoUnusable("--base needs --repo: a base is a ref of the pool's repository")
        return None
    return SessionRepos.open(path, base, review=review, workdir=workdir, pool=pool)


async def prepare(run: SessionRun, conv: Conversation) -> Outcome | None:
    repos = run.ctx.repo
    if repos is not None:
        return await repos.prepare(run, conv)
    if conv.task is not None and conv.task.base:
        return await run.end("failed", f"the task names base {conv.task.base!r}, but pool {run.ctx.pool} "
                                       "works on no repository")  # fmt: skip
    return None


async def commit_round(run: SessionRun, conv: Conversation) -> None:
    if run.ctx.repo is not None:
        await run.ctx.repo.commit_round(run, conv)


async def before_end(run: SessionRun, status: str, reason: str) -> None:
    if run.ctx.repo is not None:
        await run.ctx.repo.before_end(run, run.conversation(), status, reason)


async def release(run: SessionRun) -> None:
    if run.ctx.repo is not None:
        await run.ctx.repo.release(run.sid)


def daemons(repos: SessionRepos | None, log: SessionLog, every_s: float) -> list[Coroutine[Any, Any, None]]:
    return [repos.sweep_forever(log, every_s)] if repos is not None else []


# --- delegation -----------------------------------------------------------------------------------


async def child_changes(log: SessionLog, child: str) -> str:
    """What a finished subtask committed, for the parent's tool result ("" if it worked on no repository)."""
    records = await log.read(child)
    commits = _all(records, ChangesCommitted)
    if not commits:
        created = _last(records, BranchCreated)
        return f"\n\n[the subtask worked on branch {created.branch} of {created.repo} and committed nothing]" if (
            created) else ""  # fmt: skip
    last = commits[-1]
    stat = Stat(last.files_changed, last.insertions, last.deletions)
    return (
        f"\n\n[the subtask's changes: branch {last.branch} at commit {last.commit} in {last.repo}, "
        f"from {last.base or last.base_commit[:12]}: {stat.short()}]\n{last.stat}\n"
        f"[read_child_diff with session {child} shows the diff]"
    )


async def read_child_diff(run: SessionRun, child: str | None, stat: bool, offset: int) -> str:
    """The diff a subtask of this session committed (read-only; its repository may be another)."""
    children = [e.child_session for e in _all(run.records, DelegationRequested)]
    if not children:
        raise ToolError("this session has started no subtask")
    if not child:
        if len(set(children)) > 1:
            raise ToolError(f"name the subtask (session): one of {', '.join(dict.fromkeys(children))}")
        child = children[0]
    if child not in children:
        raise ToolError(f"{child} is not a subtask of this session; its subtasks: {', '.join(children)}")
    commits = _all(await run.ctx.log.read(child), ChangesCommitted)
    if not commits:
        raise ToolError(f"subtask {child} has committed nothing (yet)")
    last = commits[-1]
    try:
        repo = await asyncio.to_thread(Repo.open, last.repo)
        text = await diff(repo, last.base_commit, last.commit, stat=stat)
    except (GitError, RepoUnusable) as err:
        raise ToolError(f"cannot read the diff of {child} ({last.repo} must be visible to this agent): {err}") from None
    return _page(text or "(no changes)", offset)


def _page(text: str, offset: int) -> str:
    data = text.encode()
    chunk = data[offset : offset + READ_CAP].decode(errors="replace")
    if offset + READ_CAP < len(data):
        end = offset + READ_CAP
        chunk += f"\n... [diff cut: bytes {offset}-{end} of {len(data)} shown; read on with offset {end}]"
    return chunk
