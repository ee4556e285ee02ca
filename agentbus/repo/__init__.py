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

from agentbus.repo._changes import (
    Merged,
    Stat,
    checkout_commit,
    commit_all,
    diff,
    diff_stat,
    head,
    identity,
    merge,
    message_of,
    verified,
)
from agentbus.repo._git import (
    BRANCH_PREFIX,
    Done,
    GitError,
    MergeConflict,
    Repo,
    RepoUnusable,
    branch_of,
    check_rev,
    git,
    git_sync,
    is_commit_id,
    open_for_pool,
)
from agentbus.repo._worktrees import (
    Listed,
    Worktree,
    ensure_worktree,
    private_git_dir,
    remove_worktree,
    session_lock,
    worktrees,
)

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
