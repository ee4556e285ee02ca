"""Pools bound to a git repository: a worktree and a branch per session, commits per round, review and merge.

Real git on repositories made in the test's directory, a real nats-server, the real anthropic SDK
against the fake Messages API; agents in process, or as real OS processes where one is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import agentbus
from agentbus import repo as gitrepo
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import (
    BranchCreated,
    BranchMerged,
    ChangesCommitted,
    CommitFailed,
    SessionClaimed,
    VerdictRecorded,
)
from agentbus.models import AnthropicModel
from agentbus.testing import FakeMessagesAPI, text_response, tool_use_response
from services.agent.worker import AgentConfig, AgentWorker
from services.evaluator.evaluator import Evaluator
from tests.conftest import AsUser
from tests.docker_env import agentbus_image, docker_client
from tests.helpers import MODEL_ID, Gate, until

__all__ = ["agentbus_image", "docker_client"]  # fixtures, imported so pytest sees them here
pytestmark = pytest.mark.timeout(60)
Request = dict[str, Any]
E = TypeVar("E")


# --- helpers ----------------------------------------------------------------------------------------


def git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    """A repository on `main` with one commit of `files`, and a committer of its own."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "Repo Owner")
    git(path, "config", "user.email", "owner@example.invalid")
    for name, text in (files or {"README.md": "hello\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def branch_file(repo: Path, sid: str, name: str) -> str:
    return git(repo, "show", f"agentbus/{sid}:{name}")


def commits_on(repo: Path, sid: str, base: str = "main") -> list[str]:
    return git(repo, "rev-list", f"{base}..agentbus/{sid}").split()


def worktree_paths(repo: Path) -> list[str]:
    return [ln.split(" ", 1)[1] for ln in git(repo, "worktree", "list", "--porcelain").splitlines() if
            ln.startswith("worktree ")]  # fmt: skip


def turns(request: Request) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "assistant")


def prompt_of(request: Request) -> str:
    return json.dumps(request["messages"][0])


def tool_results(request: Request) -> list[dict[str, Any]]:
    return [b for m in request["messages"] if m["role"] == "user" for b in m["content"]
            if isinstance(b, dict) and b.get("type") == "tool_result"]  # fmt: skip


async def events(client: agentbus.Client, sid: str, kind: type[E]) -> list[E]:
    return [r.event for r in await client.show(sid) if isinstance(r.event, kind)]


@asynccontextmanager
async def repo_agent(
    settings: Settings, api: FakeMessagesAPI, workdir: Path, *, pool: str, repo: Path, **config: Any
) -> AsyncIterator[AgentWorker]:
    """An in-process agent of `pool` on `repo`, on its own connection; drained on exit."""
    model = AnthropicModel(MODEL_ID, api_key="test", base_url=api.base_url, max_retries=0)
    bus = await Bus.connect(settings, name=f"test-agent-{pool}")
    worker = AgentWorker(
        bus, AgentConfig(pool=pool, model=model.name, workdir=workdir, repo=str(repo), **config), model
    )
    runner = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        await worker.shutdown()
        await runner
        await model.aclose()
        await bus.close()


@asynccontextmanager
async def evaluator(settings: Settings, api: FakeMessagesAPI, workdir: Path) -> AsyncIterator[Evaluator]:
    model = AnthropicModel(MODEL_ID, api_key="test", base_url=api.base_url, max_retries=0)
    bus = await Bus.connect(settings, name="test-evaluator")
    service = Evaluator(bus, model, workdir=workdir)
    runner = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        await service.shutdown()
        await runner
        await model.aclose()
        await bus.close()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `agentbus` command, as a person runs it (the suite's admin credentials are in the environment)."""
    cmd = [sys.executable, "-m", "agentbus.cli", *args, "--nats", settings.nats_url, "--prefix", settings.prefix]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def agent_process(
    settings: Settings, api: FakeMessagesAPI, workdir: Path, repo: Path, log: Path
) -> subprocess.Popen[bytes]:
    """The real `agentbus agent --repo` as its own OS process."""
    cmd = [
        sys.executable, "-m", "agentbus.cli", "agent", "--pool", "p", "--model", f"anthropic:{MODEL_ID}",
        "--nats", settings.nats_url, "--prefix", settings.prefix, "--tools", "read_file,write_file,bash",
        "--workdir", str(workdir), "--ack-wait", "2", "--repo", str(repo),
    ]  # fmt: skip
    env = {**os.environ, "ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test"}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def _announced(client: agentbus.Client, pool: str) -> bool:
    return any(w.pool == pool and w.repo for w in await client.workers())


async def _status_is(client: agentbus.Client, sid: str, status: str) -> bool:
    return (await client.state(sid)).status == status


async def _any_worker(client: agentbus.Client) -> bool:
    return bool(await client.workers())


# --- two sessions, one repository --------------------------------------------------------------------


async def test_two_concurrent_sessions_writing_the_same_file_end_on_two_branches_with_their_own_contents(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    both_started = threading.Barrier(2, timeout=20)

    def responder(request: Request) -> Request:
        mine = "apple" if "APPLE" in prompt_of(request) else "banana"
        if turns(request) == 0:
            both_started.wait()  # the two sessions are in flight together
            return tool_use_response("write_file", {"path": "same.txt", "content": mine}, id="tu_w")
        if turns(request) == 1:
            return tool_use_response("read_file", {"path": "same.txt"}, id="tu_r")
        return text_response(f"wrote {mine}")

    with FakeMessagesAPI(responder=responder) as api:
        async with repo_agent(settings, api, tmp_path / "work", pool="p", repo=repo, concurrency=2):
            a = await client.submit("APPLE: put apple in same.txt", pool="p")
            b = await client.submit("BANANA: put banana in same.txt", pool="p")
            done = [await client.wait(sid, timeout=30) for sid in (a, b)]
        requests = [body for body, _ in api.requests]

    assert [s.status for s in done] == ["completed", "completed"], [s.reason for s in done]
    assert (branch_file(repo, a, "same.txt"), branch_file(repo, b, "same.txt")) == ("apple", "banana")
    for sid, fruit in ((a, "apple"), (b, "banana")):
        reads = [
            r for q in requests if fruit.upper() in prompt_of(q) for r in tool_results(q) if r["tool_use_id"] == "tu_r"
        ]
        assert reads and all(r["content"] == fruit for r in reads)  # each saw its own file, never the other's
        assert len(commits_on(repo, sid)) == 1
        (commit,) = await events(client, sid, ChangesCommitted)
        assert (commit.branch, commit.files_changed, commit.insertions, commit.base) == (
            f"agentbus/{sid}",
            1,
            1,
            "main",
        )
        assert commit.commit == git(repo, "rev-parse", f"agentbus/{sid}").strip()
        author = git(repo, "log", "-1", "--format=%an <%ae>%n%B", f"agentbus/{sid}")
        assert f"pool p session {sid}" in author and f"wrote {fruit}" in author
        state = await client.state(sid)
        assert (state.branch, state.commit) == (f"agentbus/{sid}", commit.commit)
    assert not (repo / "same.txt").exists() and git(repo, "status", "--porcelain") == ""  # main untouched
    assert worktree_paths(repo) == [str(repo)]  # both worktrees removed when their sessions ended


# --- kill -9 and resume in the same worktree ---------------------------------------------------------


@pytest.mark.timeout(90)
async def test_an_agent_killed_mid_session_is_finished_by_another_in_the_same_worktree_with_each_change_once(
    client: agentbus.Client, settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    repo = make_repo(tmp_path / "repo", {"log.txt": "start\n"})
    gate = Gate()

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            return tool_use_response("bash", {"command": "echo one >> log.txt"}, id="tu_1")
        if turns(request) == 1:
            gate.hold()  # the first agent dies in here, after step 1's change is made and recorded
            return tool_use_response("write_file", {"path": "two.txt", "content": "two\n"}, id="tu_2")
        return text_response("appended one, wrote two")

    work, logs = tmp_path / "work", tmp_path / "logs"
    logs.mkdir()
    with FakeMessagesAPI(responder=responder) as api:
        try:
            procs.append(agent_process(settings, api, work, repo, logs / "agent1.log"))
            sid = await client.submit("append one to log.txt, then write two.txt", pool="p")
            await gate.wait_reached(timeout=30)
            assert (work / sid / "log.txt").read_text() == "start\none\n"  # the change, in the worktree
            procs[0].send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(procs[0].wait, 10) == -signal.SIGKILL
            procs.append(agent_process(settings, api, work, repo, logs / "agent2.log"))
            gate.open()
            state = await client.wait(sid, timeout=40)
        finally:
            gate.open()

    assert state.status == "completed", state.reason
    claims = await events(client, sid, SessionClaimed)
    assert len({c.worker for c in claims}) == 2 and {c.workspace for c in claims} == {str(work / sid)}
    assert len(await events(client, sid, BranchCreated)) == 1
    (commit,) = await events(client, sid, ChangesCommitted)
    assert commits_on(repo, sid) == [commit.commit]  # one commit, made once
    assert branch_file(repo, sid, "log.txt") == "start\none\n"  # step 1's change once, not re-run
    assert branch_file(repo, sid, "two.txt") == "two\n"
    assert (commit.files_changed, commit.insertions, commit.deletions) == (2, 2, 0)
    assert worktree_paths(repo) == [str(repo)] and not (work / sid).exists()
    assert git(repo, "branch", "--list", f"agentbus/{sid}").strip() == f"agentbus/{sid}"  # the branch stays


# --- rounds: each adds a commit; checks run on the commit --------------------------------------------


async def test_a_check_failing_in_round_one_and_passing_in_round_two_leaves_two_commits_checked_as_committed(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {"version.txt": "0\n", ".gitignore": "scratch.log\n"})

    def responder(request: Request) -> Request:
        revising = "sent your result back" in json.dumps(request["messages"])
        n = sum(1 for m in request["messages"][1:] if m["role"] == "user" and "tool_result" in json.dumps(m))
        if not revising and n == 0:  # round 1: the wrong version, and an ignored file left in the worktree
            return tool_use_response("write_file", {"path": "version.txt", "content": "1\n"}, id="tu_1")
        if not revising and n == 1:
            return tool_use_response("write_file", {"path": "scratch.log", "content": "noise"}, id="tu_s")
        if not revising:
            return text_response("version 1 it is")
        if "tu_2" not in json.dumps(request["messages"]):
            return tool_use_response("write_file", {"path": "version.txt", "content": "2\n"}, id="tu_2")
        return text_response("version 2 now")

    work = tmp_path / "work"
    check = "grep -qx 2 version.txt && test ! -e scratch.log"  # scratch.log is in the worktree, not the commit
    with FakeMessagesAPI(responder=responder) as api:
        async with (
            repo_agent(settings, api, work, pool="p", repo=repo, repo_sweep_s=0.2),
            evaluator(settings, api, work),
        ):
            sid = await client.submit("set version.txt to 2", pool="p", checks=[check], max_rounds=3)
            state = await client.wait(sid, timeout=40)
            await until(lambda: asyncio.to_thread(lambda: worktree_paths(repo) == [str(repo)]),
                        "the sweep to remove the worktree of a session the evaluator ended", timeout=30)  # fmt: skip

    assert state.status == "completed", state.reason
    verdicts = await events(client, sid, VerdictRecorded)
    assert [(v.round, v.verdict) for v in verdicts] == [(1, "needs_revision"), (2, "satisfied")]
    commits = await events(client, sid, ChangesCommitted)
    assert [c.round for c in commits] == [1, 2]
    assert commits_on(repo, sid) == [commits[1].commit, commits[0].commit]  # two commits, on one branch
    assert git(repo, "show", f"{commits[0].commit}:version.txt") == "1\n"
    assert branch_file(repo, sid, "version.txt") == "2\n"
    assert "scratch.log" not in git(repo, "ls-tree", "-r", "--name-only", f"agentbus/{sid}")
    assert (commits[1].files_changed, commits[1].insertions, commits[1].deletions) == (1, 1, 1)
    assert state.commit == commits[1].commit


# --- delegation across repositories ------------------------------------------------------------------


async def test_delegating_from_a_pool_on_repo_a_to_one_on_repo_b_returns_bs_branch_and_diff_to_the_parent(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo_a = make_repo(tmp_path / "a", {"app.txt": "app\n"})
    repo_b = make_repo(tmp_path / "b", {"lib.txt": "lib v1\n"})

    def responder(request: Request) -> Request:
        if "CHILD" in prompt_of(request):
            if turns(request) == 0:
                return tool_use_response("write_file", {"path": "lib.txt", "content": "lib v2\n"}, id="tu_c")
            return text_response("lib bumped to v2")
        if turns(request) == 0:
            return tool_use_response("delegate", {"prompt": "CHILD: bump lib.txt to v2", "pool": "b"}, id="tu_d")
        if turns(request) == 1:
            return tool_use_response("read_child_diff", {}, id="tu_diff")
        if turns(request) == 2:
            return tool_use_response("write_file", {"path": "app.txt", "content": "app uses lib v2\n"}, id="tu_a")
        return text_response("app moved to lib v2")

    work = tmp_path / "work"
    tools = ("read_file", "write_file", "delegate", "read_child_diff")
    with FakeMessagesAPI(responder=responder) as api:
        async with (
            repo_agent(settings, api, work, pool="a", repo=repo_a, tools=tools, concurrency=2),
            repo_agent(settings, api, work, pool="b", repo=repo_b),
        ):
            sid = await client.submit("PARENT: move the app to lib v2", pool="a")
            state = await client.wait(sid, timeout=30)
        requests = [body for body, _ in api.requests if "PARENT" in prompt_of(body)]

    assert state.status == "completed", state.reason
    (child,) = state.children
    (child_commit,) = await events(client, child, ChangesCommitted)
    delegated = next(r for r in tool_results(requests[-1]) if r["tool_use_id"] == "tu_d")
    assert not delegated.get("is_error")
    text = delegated["content"]
    assert "lib bumped to v2" in text and f"agentbus/{child}" in text and child_commit.commit in text
    assert str(repo_b) in text and "1 file changed, +1 -1" in text and "lib.txt" in text  # the diff stat
    diff = next(r for r in tool_results(requests[-1]) if r["tool_use_id"] == "tu_diff")
    assert "-lib v1" in diff["content"] and "+lib v2" in diff["content"]
    assert branch_file(repo_b, child, "lib.txt") == "lib v2\n"  # the child's branch, in B
    assert branch_file(repo_a, sid, "app.txt") == "app uses lib v2\n"  # the parent's, in A
    assert git(repo_a, "branch", "--list", f"agentbus/{child}") == ""  # and nothing of the child's in A
    assert git(repo_b, "branch", "--list", f"agentbus/{sid}") == ""


# --- git's own locks ---------------------------------------------------------------------------------


async def test_a_git_lock_held_by_another_process_is_waited_out_and_a_dead_runs_index_lock_is_cleared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="agentbus.repo")
    repo = gitrepo.Repo.open(make_repo(tmp_path / "repo"))
    base = git(repo.top, "rev-parse", "main").strip()
    held = repo.git_dir / "refs" / "heads" / "agentbus" / "s1.lock"  # as a concurrent `git branch` holds it
    held.parent.mkdir(parents=True)
    held.write_text("")
    making = asyncio.create_task(gitrepo.ensure_worktree(repo, tmp_path / "work" / "s1", "agentbus/s1", base))

    async def retried() -> bool:
        return any("a lock is busy" in r.getMessage() for r in caplog.records)

    await until(retried, "git to find the ref locked and retry")
    assert not making.done()
    held.unlink()  # the other process finishes
    wt, made = await asyncio.wait_for(making, 20)
    assert made and git(repo.top, "rev-parse", "agentbus/s1").strip() == base

    (wt.git_dir / "index.lock").write_text("")  # a git killed with its agent left this
    (wt.path / "new.txt").write_text("new\n")
    again, made = await gitrepo.ensure_worktree(repo, wt.path, "agentbus/s1", base)  # the next run's claim
    assert not made and again == wt and not (wt.git_dir / "index.lock").exists()
    commit = await gitrepo.commit_all(again, "add new.txt\n", ("t", "t@example.invalid"))
    assert commit is not None and git(repo.top, "show", "agentbus/s1:new.txt") == "new\n"


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["not_a_repo", "no_such_base", "dirty_checkout"])
def test_an_agent_refuses_a_bad_repository_in_one_line_with_exit_2(
    settings: Settings, tmp_path: Path, case: str
) -> None:
    repo = make_repo(tmp_path / "repo")
    args = ["--repo", str(repo)]
    if case == "not_a_repo":
        (tmp_path / "plain").mkdir()
        args = ["--repo", str(tmp_path / "plain")]
    elif case == "no_such_base":
        args += ["--base", "no-such-branch"]
    else:
        (repo / "README.md").write_text("edited, not committed\n")
    done = cli(settings, "agent", "--pool", "p", "--model", "scripted:demo", "--workdir", str(tmp_path / "w"), *args)
    expected = {
        "not_a_repo": "plain is not a git repository",
        "no_such_base": "base 'no-such-branch' does not exist in",
        "dirty_checkout": "has uncommitted changes in its main checkout (README.md)",
    }[case]
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("agentbus: ") and done.stderr.count("\n") == 1 and expected in done.stderr, (
        done.stderr
    )


# --- review and merge: the one explicit step ---------------------------------------------------------


async def test_merge_fast_forwards_a_clean_branch_merges_a_moved_base_and_refuses_a_conflict_naming_the_files(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {"shared.txt": "zero\n", "other.txt": "x\n"})
    edits = {"ONE": ("shared.txt", "one\n"), "TWO": ("shared.txt", "two\n"), "THREE": ("other.txt", "y\n")}

    def responder(request: Request) -> Request:
        key = next(k for k in edits if f"{k}:" in prompt_of(request))
        if turns(request) == 0:
            path, text = edits[key]
            return tool_use_response("write_file", {"path": path, "content": text}, id="tu_w")
        return text_response(f"edited for {key}")

    with FakeMessagesAPI(responder=responder) as api:
        async with repo_agent(settings, api, tmp_path / "work", pool="p", repo=repo, review=True):
            sids = {k: await client.submit(f"{k}: edit", pool="p") for k in edits}
            for sid in sids.values():
                assert (await client.wait(sid, timeout=30)).status == "completed"
    one, two, three = sids["ONE"], sids["TWO"], sids["THREE"]
    inbox = {i.session_id: i async for i in client.inbox()}
    assert set(inbox) == {one, two, three}
    assert (
        inbox[one].why.startswith(f"ready for review: agentbus/{one}") and f"agentbus merge {one}" in inbox[one].command
    )
    stat = cli(settings, "diff", two, "--stat")
    assert stat.returncode == 0 and "shared.txt | 2 +-" in stat.stdout, stat.stderr
    assert "+two" in cli(settings, "diff", two).stdout

    main_before = git(repo, "rev-parse", "main").strip()
    merged = cli(settings, "merge", one)
    assert merged.returncode == 0 and "fast-forward" in merged.stdout, merged.stderr
    assert git(repo, "rev-parse", "main").strip() == git(repo, "rev-parse", f"agentbus/{one}").strip() != main_before
    assert (repo / "shared.txt").read_text() == "one\n"  # the main checkout moved with its branch

    after_one = git(repo, "rev-parse", "main").strip()
    refused = cli(settings, "merge", two)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "conflict" in refused.stderr and "shared.txt" in refused.stderr and "other.txt" not in refused.stderr
    assert git(repo, "rev-parse", "main").strip() == after_one  # nothing moved
    assert git(repo, "status", "--porcelain") == "" and not (repo / ".git" / "MERGE_HEAD").exists()
    assert (repo / "shared.txt").read_text() == "one\n"

    merged = cli(settings, "merge", three, "--json")
    assert merged.returncode == 0, merged.stderr
    record = json.loads(merged.stdout)
    assert "fast_forward" not in record and record["into"] == "main"  # false, left out like every default
    parents = git(repo, "rev-list", "--parents", "-n1", "main").split()
    assert parents[1:] == [after_one, git(repo, "rev-parse", f"agentbus/{three}").strip()]  # a merge commit
    assert (repo / "other.txt").read_text() == "y\n" and (repo / "shared.txt").read_text() == "one\n"

    (merge_one,) = await events(client, one, BranchMerged)
    assert (merge_one.fast_forward, merge_one.into, merge_one.author) == (True, "main", "admin")
    assert (await client.state(one)).merged == merge_one.result
    assert {i.session_id async for i in client.inbox()} == {two}  # merged ones leave the inbox
    assert await events(client, two, BranchMerged) == []


async def test_a_commit_a_hook_refuses_is_recorded_and_its_worktree_kept_and_prune_removes_only_the_gone(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo, work = make_repo(tmp_path / "repo"), tmp_path / "work"
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by policy: no secrets.txt' >&2\nexit 1\n")
    hook.chmod(0o755)

    def responder(request: Request) -> Request:
        if "ASK" in prompt_of(request):
            return tool_use_response("ask_human", {"question": "which?"}, id="tu_q")
        if turns(request) == 0:
            return tool_use_response("write_file", {"path": "secrets.txt", "content": "hunter2"}, id="tu_w")
        return text_response("wrote it")

    with FakeMessagesAPI(responder=responder) as api:
        async with repo_agent(settings, api, work, pool="p", repo=repo):
            sid = await client.submit("write secrets.txt", pool="p")
            state = await client.wait(sid, timeout=20)
            waiting = await client.submit("ASK: which one?", pool="p")
            await until(lambda: _status_is(client, waiting, "waiting"), "the second session to wait for an answer")
    assert state.status == "completed", state.reason
    failed = await events(client, sid, CommitFailed)
    assert [f.id for f in failed] == ["commit-failed-round-1"]
    assert "commit refused" in failed[0].reason and "refused by policy: no secrets.txt" in failed[0].reason
    assert await events(client, sid, ChangesCommitted) == [] and commits_on(repo, sid) == []
    assert (work / sid / "secrets.txt").read_text() == "hunter2"  # the work a commit could not take stays

    git(repo, "worktree", "add", "-q", "-b", "agentbus/ghost", str(work / "ghost"), "main")  # no such session
    pruned = await asyncio.to_thread(cli, settings, "sessions", "--prune", "--repo", str(repo))
    assert pruned.returncode == 0, pruned.stderr
    assert f"removed {work / 'ghost'} (session ghost, not in the log)" in pruned.stdout
    assert f"kept {work / sid} (session {sid}, completed)" in pruned.stdout and "uncommitted changes" in pruned.stdout
    assert sorted(worktree_paths(repo)) == sorted([str(repo), str(work / sid), str(work / waiting)])
    assert git(repo, "branch", "--list", "agentbus/ghost").strip() == "agentbus/ghost"  # branches stay


# --- choosing the base -------------------------------------------------------------------------------


async def test_submit_refuses_a_base_the_pools_repository_lacks_and_a_good_one_starts_the_branch_there(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {"f.txt": "main\n"})
    git(repo, "branch", "release", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")
    with FakeMessagesAPI(responder=lambda request: text_response("looked")) as api:
        async with repo_agent(settings, api, tmp_path / "work", pool="p", repo=repo):
            await until(lambda: _announced(client, "p"), "the agent's registry entry")
            refused = await asyncio.to_thread(cli, settings, "submit", "x", "--pool", "p", "--base", "no-such")
            assert refused.returncode == 2 and f"base 'no-such' does not exist in {repo}" in refused.stderr
            assert refused.stderr.count("\n") == 1 and await client.sessions() == []
            sid = await client.submit("look at the release", pool="p", base="release")
            state = await client.wait(sid, timeout=20)
    assert state.status == "completed", state.reason
    (created,) = await events(client, sid, BranchCreated)
    assert (created.base, created.base_commit) == ("release", git(repo, "rev-parse", "release").strip())
    (nothing,) = await events(client, sid, CommitFailed)  # it changed nothing: recorded, not a crash
    assert nothing.reason == "nothing changed in the worktree" and nothing.head == created.base_commit


async def test_a_base_on_a_pool_without_a_repository_is_refused_at_submit(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    from tests.helpers import agent

    with FakeMessagesAPI() as api:
        async with agent(settings, api, tmp_path):
            await until(lambda: _any_worker(client), "the agent's registry entry")
            with pytest.raises(agentbus.errors.UsageError, match="pool p works on no repository"):
                await client.submit("x", pool="p", base="main")


# --- fan-out -----------------------------------------------------------------------------------------


async def test_fan_out_opinions_on_a_repository_give_one_branch_per_opinion_from_the_base_asked_for(
    client: agentbus.Client, settings: Settings, tmp_path: Path
) -> None:
    from services.router.router import Router
    from services.router.routes import RouteTable

    repo = make_repo(tmp_path / "repo", {"plan.txt": "v1\n"})
    git(repo, "branch", "next", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main moves on")

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            return tool_use_response("write_file", {"path": "opinion.txt", "content": "mine\n"}, id="tu_o")
        return text_response("my opinion is in opinion.txt")

    bus = await Bus.connect(settings, name="test-router")
    router = Router(bus, RouteTable(default_pool="p"))
    routing = asyncio.create_task(router.run())
    try:
        with FakeMessagesAPI(responder=responder) as api:
            async with repo_agent(settings, api, tmp_path / "work", pool="p", repo=repo, concurrency=2):
                sid = await client.submit("what should plan.txt say?", opinions=["p", "p"], base="next")
                state = await client.wait(sid, timeout=30)
    finally:
        await router.shutdown()
        await routing
        await bus.close()
    assert state.status == "completed", state.reason
    siblings = [await client.state(c) for c in state.children]
    assert len(siblings) == 2 and all(s.status == "completed" for s in siblings)
    assert len({s.branch for s in siblings}) == 2  # one branch per opinion
    for s in siblings:
        (created,) = await events(client, s.session_id, BranchCreated)
        assert created.base_commit == git(repo, "rev-parse", "next").strip()
        assert branch_file(repo, s.session_id, "opinion.txt") == "mine\n"


# --- the pools file ----------------------------------------------------------------------------------


def test_a_pools_file_repository_reaches_the_agents_argv_and_the_containers_mounts_and_is_checked(
    tmp_path: Path,
) -> None:
    from services.supervisor.docker_spawner import repo_volume
    from services.supervisor.pools import check_repos, load_pools
    from services.supervisor.spawner import agent_args

    repo = make_repo(tmp_path / "repo")
    pools = tmp_path / "pools.toml"
    pools.write_text(f'[pools.p]\nmodel = "scripted:demo"\nrepo = "{repo}"\nbase = "main"\nreview = true\n')
    fleet = load_pools(pools)
    check_repos(fleet)
    args = agent_args(fleet.pools["p"], Settings())
    assert args[args.index("--repo") :][:5] == ["--repo", str(repo), "--base", "main", "--review"]
    assert repo_volume(fleet.pools["p"]) == [f"{repo}:{repo}"]

    pools.write_text(f'[pools.p]\nmodel = "scripted:demo"\nrepo = "{repo}"\nbase = "nope"\n')
    with pytest.raises(agentbus.errors.UsageError, match="pool p: base 'nope' does not exist in"):
        check_repos(load_pools(pools))
    pools.write_text('[pools.p]\nmodel = "scripted:demo"\nbase = "main"\n')
    with pytest.raises(agentbus.errors.UsageError, match="base needs repo"):
        load_pools(pools)


# --- a docker worker on a mounted repository ---------------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_docker_worker_works_on_the_pools_repository_mounted_at_its_own_path(
    client: agentbus.Client,
    settings: Settings,
    tmp_path: Path,
    docker_client: Any,
    agentbus_image: str,
    prefix: str,
    as_user: AsUser,
) -> None:
    from services.supervisor.docker_spawner import LABEL, DockerSpawner
    from services.supervisor.pools import Fleet, PoolSpec
    from services.supervisor.spawner import Spawners
    from tests.helpers import supervising

    repo = make_repo(tmp_path / "repo", {"service.txt": "v1\n"})
    git(repo, "config", "core.sharedRepository", "world")  # the image's user is not the owner
    await asyncio.to_thread(subprocess.run, ["chmod", "-R", "a+rwX", str(repo)], check=True)

    def responder(request: Request) -> Request:
        if turns(request) == 0:
            return tool_use_response("write_file", {"path": "service.txt", "content": "v2\n"}, id="tu_w")
        return text_response("service.txt is v2, from a container")

    env = {"ANTHROPIC_API_KEY": "test"}
    mine = {"label": [f"{LABEL}.prefix={prefix}"]}
    try:
        with FakeMessagesAPI(responder=responder) as api:
            spec = PoolSpec(
                name="p", model="anthropic:claude-sonnet-4-6", spawner="docker", image=agentbus_image,
                env={**env, "ANTHROPIC_BASE_URL": api.base_url}, concurrency=1, min=1, max=1,
                tools=("read_file", "write_file"), repo=str(repo), review=True,
            )  # fmt: skip
            creds = Path(str(as_user("worker", "agent", pools=["p"]).creds))
            os.chmod(creds, 0o644)  # mounted into the container, whose user (the image's) is not this file's owner
            spawner = DockerSpawner(
                settings, tmp_path / "logs", client=docker_client, environ={}, agent_creds=str(creds)
            )
            async with supervising(settings, Fleet({"p": spec}), Spawners({"docker": spawner})):
                sid = await client.submit("bump service.txt to v2", pool="p")
                state = await client.wait(sid, timeout=180)
                (container,) = docker_client.containers.list(filters=mine)
                mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    finally:
        for c in docker_client.containers.list(all=True, filters=mine):
            c.remove(force=True)
        for volume in docker_client.volumes.list(filters={"name": f"{prefix}-work"}):
            volume.remove(force=True)
    assert state.status == "completed", state.reason
    assert mounts[str(repo)] == str(repo)  # the repository, at its own path
    (created,) = await events(client, sid, BranchCreated)
    assert created.worktree == f"/work/{sid}" and created.repo == str(repo)  # the worktree, in the workspace volume
    (commit,) = await events(client, sid, ChangesCommitted)
    assert branch_file(repo, sid, "service.txt") == "v2\n" and commits_on(repo, sid) == [commit.commit]
    assert worktree_paths(repo) == [str(repo)]  # removed by the agent when the session ended
    assert (await client.state(sid)).needs_person  # ready for review
