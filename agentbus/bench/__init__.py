"""`agentbus bench`: agentbus against raw nats-py doing the same job, in the same run, on its own server.

- `log`: session-log appends and replay (`_log.py`);
- `e2e`: whole sessions through a router and agents, latency, throughput and messages per
  session counted on the server; resume of a long log; the session listing (`_e2e.py`).
"""

from __future__ import annotations

from agentbus.bench._e2e import format_e2e_report, run_e2e_bench
from agentbus.bench._log import TARGETS, format_report, run_log_bench

__all__ = ["TARGETS", "format_e2e_report", "format_report", "run_e2e_bench", "run_log_bench"]
