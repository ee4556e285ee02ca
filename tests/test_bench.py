"""The session-log benchmark runs end to end and reports every rate (speed is measured, not asserted)."""

from __future__ import annotations

import math

import pytest

from agentbus.bench import TARGETS, format_report, run_log_bench

RAW_KEYS = {"publish_sequential", "publish_pipelined", "replay"}
AGENTBUS_KEYS = {"append_sequential", "append_batched", "replay", "read"}


@pytest.mark.timeout(120)
async def test_log_bench_reports_positive_rates_for_every_operation() -> None:
    result = await run_log_bench(events=300)

    assert result["events"] == 300
    assert set(result["raw"]) == RAW_KEYS
    assert set(result["agentbus"]) == AGENTBUS_KEYS
    assert set(result["ratio"]) == AGENTBUS_KEYS == set(TARGETS)
    rates = [*result["raw"].values(), *result["agentbus"].values(), *result["ratio"].values()]
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in rates)
    assert isinstance(result["server"], str)
    assert result["server"][0].isdigit()


@pytest.mark.timeout(120)
async def test_log_bench_report_has_a_row_per_operation_with_a_mark() -> None:
    result = {
        "events": 10,
        "raw": {"publish_sequential": 100.0, "publish_pipelined": 1000.0, "replay": 2000.0},
        "agentbus": {"append_sequential": 90.0, "append_batched": 500.0, "replay": 1700.0, "read": 900.0},
        "ratio": {"append_sequential": 0.9, "append_batched": 0.5, "replay": 0.85, "read": 0.45},
        "server": "2.15.1",
    }

    report = format_report(result)

    assert "2.15.1" in report
    rows = [line for line in report.splitlines() if line.startswith(("append", "replay", "read"))]
    assert len(rows) == 4
    assert rows[0].endswith("✓") and rows[1].endswith("✗") and rows[2].endswith("✓")
    assert rows[3].endswith("(no target)")


@pytest.mark.timeout(240)
async def test_e2e_bench_reports_both_sides_resume_and_listing_and_prints_them() -> None:
    from agentbus.bench import format_e2e_report, run_e2e_bench

    result = await run_e2e_bench(10, slots=4, idle_s=0.3, resume_events=101, listing=(5, 20), old_reads=(0, 50))

    keys = {"pickup_p50_ms", "pickup_p99_ms", "completed_p50_ms", "completed_p99_ms", "sessions_per_s",
            "messages_per_session"}  # fmt: skip
    for side in ("raw", "agentbus"):
        for label in ("one_step", "three_step"):
            figures = result[side][label]
            assert set(figures) == keys
            assert all(math.isfinite(v) and v > 0 for v in figures.values()), (side, label, figures)
        assert math.isfinite(result[side]["messages_per_tool_turn"])
    # the sides did the same work: a raw session writes its steps, agentbus at least as much
    assert result["agentbus"]["one_step"]["messages_per_session"] >= result["raw"]["one_step"]["messages_per_session"]
    assert set(result["ratio"]) == {f"{label}.{k}" for label in ("one_step", "three_step") for k in keys}
    resume = result["resume"]
    assert resume["events"] == 101 and resume["claimed_ms"] > 0
    assert 0 < resume["first_call_ms"] < resume["first_call_and_end_ms"]  # the call began before the end
    assert set(result["listing"]) == {"5", "20"}
    assert set(result["old_reads"]) == {"0", "50"}
    assert all(v > 0 for row in result["old_reads"].values() for v in row.values())
    report = format_e2e_report(result)
    assert "resume of a 101-record log" in report and "listing    20 sessions" in report
    assert "read of an old session,     50 sessions after it" in report
