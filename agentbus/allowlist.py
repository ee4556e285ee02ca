"""Which models a session may run on a pool: the pool's own, and those its pools file lists.

Pure rules plus the submit-time check. A submitter (`submit --model`) or a route may name a model
other than the pool's; an agent runs it only if the pool allows it (`models = [...]` in the pools
file, `agentbus agent --allow-model SPEC`), and otherwise ends the session `failed` with the
reason. Where the pool's live agents announce their allow-list in the registry, `submit` refuses
a model they would not run before anything is recorded; where none runs, the agent is the backstop.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agentbus.bus import Bus
from agentbus.errors import AgentBusError, NotPermitted
from agentbus.messages import WorkerInfo


def refusal(requested: str | None, pool: str, pool_model: str, allowed: Sequence[str]) -> str | None:
    """Why a session asking for `requested` may not run on this pool, or None if it may."""
    if requested is None or requested == pool_model or requested in allowed:
        return None
    choices = ", ".join([pool_model, *allowed])
    return f"model {requested} is not allowed on pool {pool} (allowed: {choices})"


async def check_submit(bus: Bus, pool: str, model: str) -> None:
    """Refuse `submit --model` of a model the pool's live agents would not run (NotPermitted).
    Says nothing when the pool's allow-list cannot be known (no live agent, registry unreadable)."""
    try:
        values = await bus.kv_values(bus.ns.workers_bucket)
    except AgentBusError:
        return
    workers = []
    for raw in values.values():
        try:
            info = msgspec.json.decode(raw, type=WorkerInfo)
        except msgspec.MsgspecError:
            continue
        if info.pool == pool:
            workers.append(info)
    if not workers or any(refusal(model, pool, w.model, w.allowed_models) is None for w in workers):
        return
    allowed = sorted({w.model for w in workers} | {m for w in workers for m in w.allowed_models})
    raise NotPermitted(
        f"submit --model {model} to pool {pool}",
        user=bus.user,
        role=bus.identity.role,
        detail=f"the pool's agents run only {', '.join(allowed)} (pools file `models`, agent --allow-model)",
    )
