"""Settings: frozen, with defaults, read from AGENTBUS_* variables and overridden by CLI options."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from agentbus.subjects import DEFAULT_PREFIX

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
# The tools an agent offers unless told otherwise (the agent's --tools, a supervisor's pool entry):
# none of them runs a command, so none needs a sandbox.
DEFAULT_TOOLS = ("read_file", "write_file", "delegate", "ask_human")


def nats_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """`AGENTBUS_NATS_URL`, then `NATS_URL`, then the local default."""
    env = os.environ if env is None else env
    return env.get("AGENTBUS_NATS_URL") or env.get("NATS_URL") or DEFAULT_NATS_URL


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a process needs to reach the bus and size what it provisions."""

    nats_url: str = DEFAULT_NATS_URL
    prefix: str = DEFAULT_PREFIX
    replicas: int = 1
    storage: str = "file"  # or "memory"
    max_prompt_bytes: int = 1024 * 1024
    connect_timeout_s: float = 2.0
    connect_wait_s: float = 0.0  # keep trying an unreachable server this long before failing
    publish_timeout_s: float = 5.0
    failover_s: float = 15.0  # how long an idempotent request is retried while a cluster recovers
    creds: str = ""  # credentials file (AGENTBUS_CREDS); else the local context of the server, if any
    tls_ca: str = ""  # CA bundle that signed the server's certificate (AGENTBUS_TLS_CA), for tls:// URLs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {"nats_url": nats_url_from_env(env)}
        for f in fields(cls):
            raw = env.get(f"AGENTBUS_{f.name.upper()}")
            if raw is not None and f.name != "nats_url":
                values[f.name] = _coerce(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', not {settings.storage!r}")
        return settings

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _coerce(kind: Any, raw: str) -> Any:
    if kind in ("int", int):
        return int(raw)
    if kind in ("float", float):
        return float(raw)
    return raw
