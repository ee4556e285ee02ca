"""Reads the pages make besides the streams: the delegation tree, approvals, the fleet. Each as the user.

A part this user may not read (another session's state for an observer granted one, the worker
registry for a co-driver) comes back marked as such, never as an error for the whole page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from agentbus.client import Client
from agentbus.errors import AgentBusError
from agentbus.state import SessionState

TREE_NODES = 60  # sessions read for one tree at most
_ANCESTORS = 6
_READ_S = 5.0
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


async def _state(client: Client, session_id: str) -> SessionState | None:
    try:
        return await asyncio.wait_for(client.state(session_id), _READ_S)
    except (AgentBusError, TimeoutError):
        return None  # not visible to this user (or gone): shown as an id only


def _node(session_id: str, state: SessionState | None) -> dict[str, Any]:
    if state is None or not state.created_ts:
        return {"id": session_id, "visible": False, "children": []}
    return {"id": session_id, "visible": True, "status": state.status, "pool": state.pool,
            "prompt": state.prompt[:120], "cost_usd": state.cost_usd, "children": []}  # fmt: skip


async def tree(client: Client, session_id: str, state: SessionState | None = None) -> dict[str, Any]:
    """The delegation tree around a session: from its root ancestor down (parent, siblings, children,
    fan-out siblings alike), each node with its status where this user may read it. `state`: the
    session's own, when the caller has it (a long session's fold is not done twice)."""
    root = session_id
    state = state if state is not None else await _state(client, session_id)
    seen = {session_id: state}
    for _ in range(_ANCESTORS):
        if state is None or not state.parent_session:
            break
        root = state.parent_session
        state = await _state(client, root)
        seen[root] = state
    top = _node(root, seen[root])
    level, read = [(top, seen[root])], len(seen)
    while level and read < TREE_NODES:
        nxt = []
        for node, st in level:
            for child in st.children if st is not None else ():
                if read >= TREE_NODES:
                    node["more"] = True
                    break
                cst = seen.get(child) if child in seen else await _state(client, child)
                read += child not in seen
                seen[child] = cst
                cnode = _node(child, cst)
                node["children"].append(cnode)
                nxt.append((cnode, cst))
        level = nxt
    return {"root": top, "current": session_id}


async def approvals(client: Client, session_id: str) -> list[dict[str, Any]]:
    """The tool calls of a session that wait for a decision, with their whole input."""
    waiting = await client.control.pending_approvals(session_id)
    return [
        {"tool_use_id": r.tool_use_id, "name": r.name, "input": r.input, "step": r.step, "timeout_s": r.timeout_s}
        for r in waiting
    ]


def read_ceilings(path: str | None) -> dict[str, Any]:
    """The dollar ceilings of a pools file (the fleet's and each pool's): the supervisor's, which
    the bus does not carry. `${NAME}` and `${NAME:-default}` are read from the environment."""
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}

    def usd(value: object) -> float | None:
        if isinstance(value, str):
            value = _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
        try:
            return float(value) if value not in ("", None) else None  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    found = data.get("pools")
    pools: dict[str, Any] = found if isinstance(found, dict) else {}
    return {
        "fleet": usd(data.get("ceiling_usd")),
        "pools": {name: usd(p.get("ceiling_usd")) for name, p in pools.items() if isinstance(p, dict)},
    }


async def _part(what: str, coro: Any) -> dict[str, Any]:
    try:
        return {"ok": await asyncio.wait_for(coro, _READ_S)}
    except TimeoutError:
        return {"error": f"{what}: no answer in {_READ_S:g}s (your role may not read it)"}
    except AgentBusError as err:
        return {"error": f"{what}: {err}"}


async def fleet(client: Client, ceilings: dict[str, Any]) -> dict[str, Any]:
    """Pools (workers, backlog), live workers, spend per pool and holds, with the ceilings known."""
    pools, workers, spend = await asyncio.gather(
        _part("pools", client.pools()), _part("workers", client.workers()), _part("spend", client.spend())
    )
    out: dict[str, Any] = {"now": time.time(), "ceilings": ceilings}
    out["pools"] = (
        {"ok": [{**dataclasses.asdict(p), "served": p.served} for p in pools["ok"]]} if "ok" in pools else pools
    )
    out["workers"] = {"ok": [msgspec.to_builtins(w) for w in workers["ok"]]} if "ok" in workers else workers
    if "ok" in spend:
        totals, holds = spend["ok"]
        out["spend"] = {"ok": {
            "totals": {k: msgspec.to_builtins(v) for k, v in totals.items()},
            "holds": {k: msgspec.to_builtins(v) for k, v in holds.items()},
        }}  # fmt: skip
    else:
        out["spend"] = spend
    return out
