"""The evaluator's checks: sandboxed like bash, on a copy of the workspace the evaluator finds itself."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

import agentbus
from agentbus.bus import Bus
from agentbus.config import Settings
from agentbus.messages import ModelResponded, SessionClaimed, VerdictRecorded
from agentbus.sandbox import Bubblewrap
from agentbus.session import SessionLog
from services.evaluator.evaluator import Evaluator
from services.evaluator.grading import OUTPUT_CAP, run_checks
from tests.test_sandbox import _token, _with

SECRET = "sk-ant-evaluator-" + secrets.token_hex(8)


@pytest.fixture
def sandbox() -> Bubblewrap:
    box = Bubblewrap()
    box.probe()
    return box


async def test_a_check_cannot_see_the_evaluators_environment_or_leave_processes(
    tmp_path: Path, sandbox: Bubblewrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("AGENTBUS_NATS_URL", "nats://secret-host:4222")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "result.txt").write_text("42")
    token = _token()
    checks = (f"env; cat /proc/*/environ; sleep 1000.{token} & cat result.txt", "yes | head -c 100000; exit 3")
    [env, loud] = await run_checks(checks, tmp_path, "s1", sandbox)
    assert env.passed and env.output.endswith("42")
    assert SECRET not in env.output and "secret-host" not in env.output
    assert _with(token) == [], "nothing a check started outlives it"
    assert (loud.passed, loud.exit_code) == (False, 3), "output past the cap is drained, the exit code kept"
    assert len(loud.output) < OUTPUT_CAP + 100


async def test_a_check_works_on_a_copy_and_the_workspace_stays_as_it_was(tmp_path: Path, sandbox: Bubblewrap) -> None:
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "keep.txt").write_text("original")
    [check] = await run_checks(("echo changed > keep.txt; rm -f keep.txt; touch new.txt",), tmp_path, "s1", sandbox)
    assert check.passed
    assert os.listdir(tmp_path / "s1") == ["keep.txt"]
    assert (tmp_path / "s1" / "keep.txt").read_text() == "original"


async def test_a_session_id_that_would_leave_the_root_runs_no_check(tmp_path: Path, sandbox: Bubblewrap) -> None:
    [check] = await run_checks(("true",), tmp_path, "../etc", sandbox)
    assert not check.passed and "cannot name a workspace" in check.output


async def test_the_evaluator_ignores_the_workspace_a_session_claimed_event_names(
    client: agentbus.Client, settings: Settings, tmp_path: Path, sandbox: Bubblewrap
) -> None:
    root, decoy = tmp_path / "work", tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "proof.txt").write_text("planted")
    sid = await client.submit("x", pool="nobody", checks=["test -f proof.txt"], max_rounds=1)
    log = SessionLog(client.bus)
    await log.append(sid, SessionClaimed(id="claim-x", worker="w", workspace=str(decoy)))
    await log.append(sid, ModelResponded(id="step-1", step=1, model="m", content=({"type": "text", "text": "ok"},)))
    bus = await Bus.connect(settings)
    try:
        evaluator = Evaluator(bus, None, workdir=root, sandbox=sandbox)
        await evaluator.evaluate(sid, 1)
    finally:
        await bus.close()
    [verdict] = [r.event for r in await client.show(sid) if isinstance(r.event, VerdictRecorded)]
    assert verdict.verdict != "satisfied"
    assert not verdict.checks[0].passed, "the decoy's file was not seen: the check ran on root/<session id>"
    (root / sid).mkdir(parents=True)
    (root / sid / "proof.txt").write_text("made by the agent")
    [check] = await run_checks(("test -f proof.txt",), root, sid, sandbox)
    assert check.passed, "the evaluator's own root is where it looks"
